"""Real stand-ins for tests, benchmarks and the demo: an embedded Kafka broker and loopback API servers.

``MistralServer`` (and ``OpenAIServer``, and ``LlmServer`` for chat completions) are real HTTP/1.1 servers on ``127.0.0.1`` that
speak the hosted API's exact wire format, with deterministic scores (``fake_scores``),
scripted faults (``worker.testing.faults``), a rate-limit window and a request log. They
need only the standard library at import time; validating bodies against the OpenAPI
document (``worker.testing.openapi``) needs the ``test`` extra. ``DsaTransparencyServer`` stands
in for the EU DSA Transparency Database's submission API (its validation errors, duplicate
``puid`` refusals and a record of what it stored).
"""

from worker.testing.dsa_server import DsaTransparencyServer
from worker.testing.faults import Fault, FaultPlan, combine, every, first, when_input_contains
from worker.testing.llm_server import LlmServer
from worker.testing.loopback import RateLimit, RecordedRequest
from worker.testing.mistral_server import CATEGORIES_2411, CATEGORIES_2603, MistralServer, fake_scores
from worker.testing.openai_server import OPENAI_CATEGORIES, OpenAIServer

__all__ = [
    "CATEGORIES_2411",
    "CATEGORIES_2603",
    "OPENAI_CATEGORIES",
    "DsaTransparencyServer",
    "Fault",
    "FaultPlan",
    "LlmServer",
    "MistralServer",
    "OpenAIServer",
    "RateLimit",
    "RecordedRequest",
    "combine",
    "every",
    "fake_scores",
    "first",
    "when_input_contains",
]
