"""Byte constants and display helpers. Everything inside vramplan is bytes; GiB only at display."""

from __future__ import annotations

KiB = 2**10
MiB = 2**20
GiB = 2**30


def gib(nbytes: float) -> float:
    return nbytes / GiB


def fmt_gib(nbytes: float, digits: int = 2) -> str:
    return f"{nbytes / GiB:.{digits}f} GiB"


def fmt_count(n: int) -> str:
    """A parameter count the way people say it: 8.03B, 494M, 11.3M."""
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}" if n / div < 100 else f"{n / div:.0f}{suffix}"
    return str(n)
