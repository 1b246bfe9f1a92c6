"""Small helpers shared by the ``scripts/`` command lines (``key=value`` arguments, sizes)."""

from __future__ import annotations

from typing import Any, Callable, Mapping


class UsageError(ValueError):
    """A command-line argument is wrong; the message says which and what is valid."""


def parse_key_values(argv: list[str], options: Mapping[str, Callable[[str], Any]],
                     defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``key=value`` arguments converted by ``options[key]``, over ``defaults``; unknown keys and
    unconvertible values raise :class:`UsageError` naming the argument."""
    opts = dict(defaults)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in options:
            raise UsageError(f"argument {arg!r}: expected key=value with key in {', '.join(options)}")
        try:
            opts[key] = options[key](value)
        except ValueError:
            raise UsageError(f"{arg}: not a valid {key}") from None
    return opts


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units)."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)
