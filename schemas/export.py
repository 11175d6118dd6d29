"""JSON Schema export of the contracts, for non-Python producers and consumers."""

from __future__ import annotations

import json
from pathlib import Path

from schemas.models import CONTRACT_VERSION, EXPORTED_MODELS

CHECKED_IN_DIR = Path(__file__).parent / "json"


def json_schemas() -> dict[str, str]:
    """Return ``{file name: JSON text}`` for every exported model, deterministically."""
    out: dict[str, str] = {}
    for name, model in EXPORTED_MODELS.items():
        schema = model.model_json_schema(mode="serialization" if name in ("verdict", "violation") else "validation")
        schema["$id"] = f"https://moderation-worker.dev/schemas/v{CONTRACT_VERSION}/{name}.schema.json"
        out[f"{name}.schema.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def export_json_schemas(directory: Path) -> list[Path]:
    """Write the schema files into ``directory`` (created if missing); return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, text in json_schemas().items():
        path = directory / file_name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
