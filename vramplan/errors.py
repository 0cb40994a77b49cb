"""The one exception type vramplan raises for bad input: the CLI prints its message on one line."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class VramplanError(ValueError):
    """Bad input: the message names the bad value and what is allowed."""


def close_matches(word: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """Names in `choices` close to `word` (case-insensitive), best first."""
    lowered = {c.lower(): c for c in choices}
    return [lowered[m] for m in difflib.get_close_matches(word.lower(), list(lowered), n=n, cutoff=0.6)]


def unknown(what: str, value: str, choices: Iterable[str], hint: str = "") -> VramplanError:
    """An 'unknown X' error that suggests close names, or lists the allowed ones when few."""
    choices = list(choices)
    near = close_matches(value, choices)
    if near:
        tail = f"did you mean {', '.join(near)}?"
    elif len(choices) <= 12:
        tail = f"allowed: {', '.join(choices)}"
    else:
        tail = hint or f"{len(choices)} names are known"
    return VramplanError(f"unknown {what} {value!r}: {tail}")
