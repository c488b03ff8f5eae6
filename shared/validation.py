"""One line for a pydantic ValidationError, for the CLI's one-line failures (docs/usage.md)."""

from __future__ import annotations

from pydantic import ValidationError


def error_message(error: dict) -> str:
    """pydantic's message of one error, on one line, without its ``Value error, `` prefix."""
    return " ".join(str(error.get("msg", "")).split()).removeprefix("Value error, ")


def describe_validation_error(exc: ValidationError, source: str, limit: int | None = 5) -> str:
    """``federation file f.json: config.rank: Input should be a valid integer; backbone: Field required``.

    Each error is named by its path in the document (list items by index); inputs are not echoed
    (a file may hold secrets). At most ``limit`` errors are listed (None: all), then how many more
    there are; an error of the whole document is named ``(top level)``."""
    errors = exc.errors()
    limit = len(errors) if limit is None else limit
    parts = []
    for error in errors[:limit]:
        loc = ".".join(str(part) for part in error.get("loc") or ())
        parts.append(f"{loc or '(top level)'}: {error_message(error)}")
    if len(errors) > limit:
        parts.append(f"and {len(errors) - limit} more")
    return f"{source}: {'; '.join(parts)}"
