"""JSON Schema export of the contracts, for non-Python producers and consumers.

The published schemas follow the compatibility rule of ``models``: they allow properties
they do not declare, so a consumer validating with them keeps working when a field is
added within the same contract version. ``strict_json_schema`` is the same schema closed
everywhere: what the worker itself must write, checked by its tests.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from .models import CONTRACT_VERSION, EXPORTED_MODELS

CHECKED_IN_DIR = Path(__file__).parent / "json"

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

SCHEMA_BASE_URI = f"https://moderation-worker.dev/schemas/v{CONTRACT_VERSION}"
"""Every schema's ``$id`` starts with this: the contract version stands in it."""


def schema_of(name: str) -> dict[str, Any]:
    """The published JSON Schema of the model exported as ``name`` (``verdict``, ...)."""
    model = EXPORTED_MODELS[name]
    schema = model.model_json_schema(mode="serialization" if name in ("verdict", "violation") else "validation")
    schema["$schema"] = JSON_SCHEMA_DIALECT
    schema["$id"] = f"{SCHEMA_BASE_URI}/{name}.schema.json"
    schema["x-contract-version"] = CONTRACT_VERSION
    return schema


def json_schemas() -> dict[str, str]:
    """Return ``{file name: JSON text}`` for every exported model, deterministically."""
    return {
        f"{name}.schema.json": json.dumps(schema_of(name), indent=2, sort_keys=True) + "\n" for name in EXPORTED_MODELS
    }


def strict_json_schema(name: str) -> dict[str, Any]:
    """``schema_of(name)`` with ``additionalProperties: false`` on every object that lists
    its properties: a record valid under it has only the declared fields (open maps such as
    ``scores`` and ``metadata`` stay open)."""
    schema = copy.deepcopy(schema_of(name))

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                node.setdefault("additionalProperties", False)
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


def export_json_schemas(directory: Path) -> list[Path]:
    """Write the schema files into ``directory`` (created if missing); return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, text in json_schemas().items():
        path = directory / file_name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
