"""Turning pydantic's ValidationError into fedrelay's own, readable errors."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from relay.errors import EnvelopeError

B = TypeVar("B", bound=BaseModel)

_MAX_SHOWN = 80


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def describe(
    error: ValidationError, *, what: str, tags: Mapping[str, Collection[str]] | None = None
) -> str:
    """One line per problem: ``<what>.<field>: got <value>; expected <pydantic's words>``.

    ``tags`` names the discriminated unions: under field ``f``, pydantic puts the chosen
    member's tag in the location, where the user wrote no such key; it is left out.
    """
    lines = []
    for problem in error.errors(include_url=False):
        loc = problem["loc"]
        shown = [
            part
            for i, part in enumerate(loc)
            if not (tags and i and str(part) in tags.get(str(loc[i - 1]), ()))
        ]
        field = ".".join(str(part) for part in shown)
        message = problem["msg"].removeprefix("Value error, ")
        if not field:
            lines.append(f"{what}: {message}")
        elif problem["type"] == "missing":
            lines.append(f"{what}.{field}: missing; it is required")
        elif (
            problem["type"] == "extra_forbidden"
            or "password" in field.lower()
            or isinstance(problem.get("input"), Mapping)
        ):
            # The value of a misspelt or secret key, or a whole section, may hold a password:
            # never echo it.
            lines.append(f"{what}.{field}: {message}")
        else:
            lines.append(f"{what}.{field}: {message} (got {_shown(problem.get('input'))})")
    return "; ".join(lines)


def parse(schema: type[B], data: Any, *, what: str) -> B:
    """Validate ``data`` against a pydantic model; raise EnvelopeError naming each bad field."""
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise EnvelopeError(describe(e, what=what)) from e


def parse_json(schema: type[B], text: str | bytes, *, what: str) -> B:
    """Validate JSON text against a pydantic model, with the same error style as :func:`parse`."""
    try:
        return schema.model_validate_json(text)
    except ValidationError as e:
        raise EnvelopeError(describe(e, what=what)) from e
