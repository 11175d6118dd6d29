"""Validate request and response bodies against an OpenAPI 3.1 document.

The loopback test servers take any ``BodyValidator`` (a callable ``(path, body) -> list of
error messages``); ``load_spec_validator`` builds one from a vendored OpenAPI file such as
``tests/specs/mistral-moderation.openapi.yaml``. ``openapi-schema-validator`` (the ``test``
extra) is imported only here and only when a validator is built, so importing
``worker.testing`` needs neither it nor the spec file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

BodyValidator = Callable[[str, Any], list[str]]
"""``validator(path, body)`` returns one message per violation; empty when the body is valid."""


class SpecValidator:
    """Request and response validators for every ``POST`` operation of one OpenAPI document.

    Calling the object validates a request body (the ``BodyValidator`` contract).
    ``response_errors`` validates an answer for a path and status code. A path the document
    does not describe is itself reported as a violation.
    """

    def __init__(self, spec: Mapping[str, Any]) -> None:
        from openapi_schema_validator import OAS31Validator

        components = spec.get("components", {})

        def validator_for(schema: Mapping[str, Any]) -> Any:
            # The operation's schema refers to '#/components/...': give it the components
            # as its own root so the JSON pointers resolve.
            return OAS31Validator({**schema, "components": components})

        self._requests: dict[str, Any] = {}
        self._responses: dict[tuple[str, int], Any] = {}
        for path, item in spec.get("paths", {}).items():
            operation = item.get("post")
            if operation is None:
                continue
            body_schema = operation["requestBody"]["content"]["application/json"]["schema"]
            self._requests[path] = validator_for(body_schema)
            for status, response in operation.get("responses", {}).items():
                content = response.get("content", {}).get("application/json")
                if content is not None:
                    self._responses[(path, int(status))] = validator_for(content["schema"])

    @property
    def paths(self) -> list[str]:
        return sorted(self._requests)

    def __call__(self, path: str, body: Any) -> list[str]:
        validator = self._requests.get(path)
        if validator is None:
            return [f"POST {path} is not in the specification"]
        return [_describe(error) for error in validator.iter_errors(body)]

    def response_errors(self, path: str, status: int, body: Any) -> list[str]:
        """Violations of the documented response schema; [] when the status is undocumented."""
        validator = self._responses.get((path, status))
        if validator is None:
            return []
        return [_describe(error) for error in validator.iter_errors(body)]


def load_spec_validator(spec_file: str | Path) -> SpecValidator:
    """Build a ``SpecValidator`` from an OpenAPI 3.1 YAML or JSON file."""
    with Path(spec_file).open(encoding="utf-8") as handle:
        return SpecValidator(yaml.safe_load(handle))


def _describe(error: Any) -> str:
    where = "/".join(str(part) for part in error.absolute_path) or "<body>"
    return f"{where}: {error.message}"
