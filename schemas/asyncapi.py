"""The AsyncAPI 3 document of every topic the worker reads and writes, generated from the models.

``schemas/asyncapi.yaml`` is this module's output (``modworker schemas asyncapi``); a test
fails when the checked-in file is stale and validates it against the AsyncAPI 3.0.0 JSON
Schema. Topic names are the worker's defaults (``MODWORKER_*_TOPIC`` renames them; a test
keeps the two in step). Operations are the worker's: it receives the inputs and sends the
rest. Needs PyYAML, so the package's ``__init__`` does not import it.
"""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from .models import CONTRACT_VERSION, EXPORTED_MODELS, DeadLetterHeaders, OutputHeaders

KAFKA_BINDING_VERSION = "0.5.0"

TOPICS = {
    "content": "ugc.content",
    "conversation": "ugc.conversations",
    "verdict": "moderation.verdicts",
    "violation": "moderation.violations",
    "dead_letter": "moderation.dead-letter",
    "shadow": "moderation.shadow-verdicts",
    "statements_of_reasons": "moderation.statements-of-reasons",
    "conversation_state": "moderation.conversation-state",
    "reviews": "moderation.reviews",
}
"""Default topic names, as the worker's settings have them."""

_REF = "#/components/schemas/{model}"


def _key(description: str) -> dict[str, Any]:
    return {"key": {"type": "string", "description": description}, "bindingVersion": KAFKA_BINDING_VERSION}


def _output_headers() -> dict[str, Any]:
    return {
        "type": "object",
        "required": [OutputHeaders.CONTENT_TYPE, OutputHeaders.CONTRACT],
        "properties": {
            OutputHeaders.CONTENT_TYPE: {"type": "string", "const": "application/json"},
            OutputHeaders.CONTRACT: {
                "type": "string",
                "const": CONTRACT_VERSION,
                "description": "Major contract version of the payload. Within it changes are additive only: "
                "ignore fields you do not know.",
            },
        },
    }


def _dead_letter_headers() -> dict[str, Any]:
    described = {
        DeadLetterHeaders.STAGE: "Stage that rejected the input: decode, backend, output, statement, review or submit.",
        DeadLetterHeaders.ERROR_TYPE: "Machine-readable reason (not_json, schema, empty_text, too_long, "
        "backend_rejected, invalid_scores, llm_unparseable, backend_failed, output_too_large, "
        "invalid_statement, unknown_category, invalid_review, duplicate_review, unknown_verdict, submission_refused, "
        "...).",
        DeadLetterHeaders.MESSAGE: "Human-readable reason, at most 1,000 characters.",
        DeadLetterHeaders.ORIGIN_TOPIC: "Topic the input was read from.",
        DeadLetterHeaders.ORIGIN_PARTITION: "Its partition (decimal).",
        DeadLetterHeaders.ORIGIN_OFFSET: "Its offset (decimal).",
        DeadLetterHeaders.TRUNCATED: "Only when cut to fit: value, or value,headers.",
        DeadLetterHeaders.ORIGINAL_SIZE: "With the truncated header: the original value's size in bytes.",
    }
    required = [
        DeadLetterHeaders.STAGE,
        DeadLetterHeaders.ERROR_TYPE,
        DeadLetterHeaders.MESSAGE,
        DeadLetterHeaders.ORIGIN_TOPIC,
        DeadLetterHeaders.ORIGIN_PARTITION,
        DeadLetterHeaders.ORIGIN_OFFSET,
    ]
    return {
        "type": "object",
        "description": "The input's own headers, unchanged, plus these.",
        "required": required,
        "properties": {name: {"type": "string", "description": text} for name, text in described.items()},
    }


def asyncapi_document() -> dict[str, Any]:
    """The AsyncAPI 3.0.0 document, as plain data, deterministically."""
    _, top = models_json_schema(
        [(model, "serialization" if name in ("verdict", "violation") else "validation") for name, model in
         EXPORTED_MODELS.items()],
        ref_template=_REF,
    )  # fmt: skip
    schemas: dict[str, Any] = dict(sorted(top.get("$defs", {}).items()))
    schemas["ConversationStateChange"] = {
        "type": "object",
        "description": "Internal to the worker: a conversation's recent turns (a null value forgets it). "
        "Not a contract; do not consume.",
    }
    schemas["OriginalInput"] = {"description": "The input's value as it was read, byte for byte (often not JSON)."}

    def message(name: str, title: str, summary: str, payload: str, key: str, headers: dict[str, Any]) -> Any:
        return {
            "name": name,
            "title": title,
            "summary": summary,
            "contentType": "application/json",
            "headers": headers,
            "payload": {"$ref": _REF.format(model=payload)},
            "bindings": {"kafka": _key(key)},
        }

    input_headers = {"type": "object", "description": "Any; the worker reads none and keeps them on dead letters."}
    messages = {
        "ContentEvent": message(
            "ContentEvent", "Content event", "A piece of user-generated content to judge.", "ContentEvent",
            "The content id (id); the producer's choice, used for ordering only.", input_headers,
        ),
        "ConversationEvent": message(
            "ConversationEvent", "Conversation turn", "One conversation turn to judge, with optional context.",
            "ConversationEvent", "The conversation id: one conversation's turns stay in order.", input_headers,
        ),
        "ReviewDecision": message(
            "ReviewDecision", "Review decision", "A human reviewer's decision on a machine verdict; the worker "
            "answers it with a superseding verdict.", "ReviewDecision",
            "The verdict's key (the content id or the conversation id): its superseding verdict lands on the "
            "machine verdict's partition.", input_headers,
        ),
        "Verdict": message(
            "Verdict", "Verdict", "The decision for one input; one per valid input, at least once. A reviewer's "
            "decision gives a verdict with supersedes set and decided_by human.", "Verdict",
            "The input's key.", _output_headers(),
        ),
        "Violation": message(
            "Violation", "Violation", "The compact event for a flagged input, published after its verdict.",
            "Violation", "The input's key.", _output_headers(),
        ),
        "ShadowVerdict": message(
            "ShadowVerdict", "Shadow verdict", "A candidate backend's or policy's decision beside the live one.",
            "ShadowVerdict", "The input's key.", _output_headers(),
        ),
        "StatementOfReasons": message(
            "StatementOfReasons", "Statement of reasons", "The EU DSA statement of reasons of a verdict that "
            "restricts content: a DSA Transparency Database API statement body; puid = the verdict_id.",
            "StatementOfReasons", "The input's key.", _output_headers(),
        ),
        "DeadLetter": {
            **message(
                "DeadLetter", "Dead letter", "An input that could not be judged: its key, value and headers "
                "unchanged, plus the reason headers.", "OriginalInput", "The input's key, unchanged.",
                _dead_letter_headers(),
            ),
            "contentType": "application/octet-stream",
        },
        "ConversationStateChange": {
            **message(
                "ConversationStateChange", "Conversation state change", "Internal changelog record.",
                "ConversationStateChange", "The conversation id.", {"type": "object"},
            ),
        },
    }  # fmt: skip

    def channel(topic: str, description: str, names: list[str], configs: dict[str, Any]) -> dict[str, Any]:
        return {
            "address": TOPICS[topic],
            "description": description,
            "messages": {name: {"$ref": f"#/components/messages/{name}"} for name in names},
            "bindings": {
                "kafka": {
                    "topic": TOPICS[topic],
                    "topicConfiguration": configs,
                    "bindingVersion": KAFKA_BINDING_VERSION,
                }
            },
        }

    retained = {"cleanup.policy": ["delete"]}
    channels = {
        "content": channel("content", "Input: content to judge (MODWORKER_CONTENT_TOPIC).", ["ContentEvent"], retained),
        "conversations": channel(
            "conversation", "Input: conversation turns (MODWORKER_CONVERSATION_TOPIC).", ["ConversationEvent"], retained
        ),
        "reviews": channel(
            "reviews", "Input, only with MODWORKER_REVIEWS__ENABLED=true: human review decisions "
            "(MODWORKER_REVIEWS__TOPIC).", ["ReviewDecision"], retained,
        ),
        "verdicts": channel(
            "verdict", "Output: a Verdict per valid input (MODWORKER_VERDICT_TOPIC).", ["Verdict"], retained
        ),
        "violations": channel(
            "violation", "Output: a Violation per flagged input (MODWORKER_VIOLATION_TOPIC).", ["Violation"], retained
        ),
        "deadLetters": channel(
            "dead_letter", "Output: inputs that could not be judged (MODWORKER_DEAD_LETTER_TOPIC).", ["DeadLetter"],
            retained,
        ),
        "shadowVerdicts": channel(
            "shadow", "Output, only with shadow evaluation on (MODWORKER_SHADOW__TOPIC).", ["ShadowVerdict"], retained
        ),
        "statementsOfReasons": channel(
            "statements_of_reasons", "Output, only with MODWORKER_DSA__ENABLED=true: a StatementOfReasons per "
            "restricting verdict, in the verdict's transaction (MODWORKER_DSA__TOPIC).", ["StatementOfReasons"],
            retained,
        ),
        "conversationState": channel(
            "conversation_state", "Internal: the conversation state's changelog, compacted "
            "(MODWORKER_CONVERSATION__CHANGELOG_TOPIC); written and read back by the worker only.",
            ["ConversationStateChange"], {"cleanup.policy": ["compact"]},
        ),
    }  # fmt: skip

    def operation(action: str, channel_name: str, summary: str) -> dict[str, Any]:
        messages_of = channels[channel_name]["messages"]
        return {
            "action": action,
            "channel": {"$ref": f"#/channels/{channel_name}"},
            "summary": summary,
            "messages": [{"$ref": f"#/channels/{channel_name}/messages/{name}"} for name in messages_of],
        }

    operations = {
        "judgeContent": operation("receive", "content", "The worker consumes content events (its consumer group)."),
        "judgeTurns": operation("receive", "conversations", "The worker consumes conversation turns."),
        "applyReviews": operation(
            "receive", "reviews", "The worker consumes review decisions (same group) and supersedes verdicts."
        ),
        "publishVerdicts": operation("send", "verdicts", "A verdict for every valid input."),
        "publishViolations": operation("send", "violations", "A violation for every flagged input."),
        "publishDeadLetters": operation("send", "deadLetters", "Inputs that could not be judged."),
        "publishShadowVerdicts": operation("send", "shadowVerdicts", "Sampled shadow decisions."),
        "publishStatementsOfReasons": operation(
            "send", "statementsOfReasons", "A statement of reasons for every restricting verdict (DSA on)."
        ),
        "writeConversationState": operation("send", "conversationState", "State changes, with the verdict."),
        "restoreConversationState": operation("receive", "conversationState", "Read back on partition assignment."),
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "moderation-worker",
            "version": CONTRACT_VERSION,
            "description": "Topics of the streaming moderation worker. The version is the contract's major "
            "version, also in the modworker-contract header of every output record. Within it changes are "
            "additive only and consumers ignore unknown fields.",
        },
        "defaultContentType": "application/json",
        "servers": {
            "kafka": {
                "host": "{bootstrap}",
                "protocol": "kafka",
                "description": "Your Kafka cluster (KAFKA_BOOTSTRAP_SERVERS).",
                "variables": {"bootstrap": {"default": "localhost:9092"}},
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }


def asyncapi_yaml() -> str:
    """``asyncapi_document()`` as the YAML text checked in as ``schemas/asyncapi.yaml``."""
    import json

    import yaml

    plain = json.loads(json.dumps(asyncapi_document()))  # no shared objects: no YAML anchors
    header = "# Generated by `modworker schemas asyncapi` from schemas/models.py: do not edit.\n"
    return header + yaml.safe_dump(plain, sort_keys=False, allow_unicode=True, width=100)
