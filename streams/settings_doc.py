"""Generate docs/configuration.md from the settings models.

Run `python -m autopull.streams.settings_doc > docs/configuration.md`; a test checks
that the committed page matches the settings.
"""

from __future__ import annotations

import sys
import types
import typing
from typing import Any

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from autopull.streams.settings import Settings

HEADER = """# Configuration

Every setting comes from an environment variable, or from the YAML file named by
`AUTOPULL_CONFIG` (keys as in the first column, nested with indentation). Environment
variables win over the file. Nested settings use `__` between the parts of the name,
for example `AUTOPULL_GRAPH__CLIENT_SECRET`. Lists and mappings are given as JSON in
environment variables. Secret values are never logged and never shown in errors.

This page is generated from the settings models by
`python -m autopull.streams.settings_doc`.
"""


def _models_of(annotation: Any) -> list[type[BaseModel]]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _models_of(arg)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return []


def _type_name(annotation: Any) -> str:
    text = repr(annotation) if not isinstance(annotation, type) else annotation.__name__
    return (
        text.replace("typing.", "").replace("pathlib.", "").replace("NoneType", "None")
    )


def _default(field: FieldInfo) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
        return "" if isinstance(value, BaseModel) else f"`{value!r}`"
    if isinstance(field.default, SecretStr):
        return "secret"
    return f"`{field.default!r}`"


def rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """Return (setting, type, default, description) for every field, nested first."""
    result = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        nested = _models_of(field.annotation)
        description = (field.description or "").replace("|", "\\|")
        if nested and typing.get_origin(field.annotation) is not dict:
            result.append((key, nested[0].__name__, _default(field), description))
            for nested_model in nested:
                result.extend(rows(nested_model, f"{key}."))
            continue
        result.append((key, _type_name(field.annotation), _default(field), description))
    return result


def render() -> str:
    """Return the configuration reference as Markdown."""
    lines = [HEADER, "| setting | environment variable | type | default | meaning |"]
    lines.append("| --- | --- | --- | --- | --- |")
    for key, type_name, default, description in rows(Settings):
        variable = "AUTOPULL_" + key.upper().replace(".", "__")
        lines.append(
            f"| `{key}` | `{variable}` | {type_name.replace('|', 'or')} | {default} "
            f"| {description} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
