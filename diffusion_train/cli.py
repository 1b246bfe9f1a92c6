"""Small helpers shared by the command lines (``key=value`` arguments, config numbers, sizes, one-line errors)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


class UsageError(ValueError):
    """A command-line argument is wrong; the message says which and what is valid."""


class UserError(RuntimeError):
    """Bad data, or a run state that refuses the work (a busy run directory, a diverged run): the command lines
    show its message as one line, like a ValueError's."""


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


def split_arguments(argv: list[str], options: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """A script's positional arguments (run folders, files) and its ``key=value`` options. A ``key=value`` argument
    is an option when its key is one, and also when it looks like ``word=value`` and no such path exists: a
    mistyped option (``validat=true``), which :func:`parse_key_values` then names, instead of a run folder that is
    not there. A path with ``=`` in it (a sweep job's folder, ``runs/x/model=dit_s4``) stays positional."""
    from pathlib import Path

    positional, given = [], []
    for arg in argv:
        key, sep, _ = arg.partition("=")
        is_option = sep and (key in options or (key.isidentifier() and not Path(arg).exists()))
        (given if is_option else positional).append(arg)
    return positional, given


def check_numbers(cfg: Any, rules: Mapping[str, tuple[type, float | None]]) -> None:
    """One-line errors naming the key for the config values of ``rules`` (dotted key -> (``int`` or ``float``, the
    minimum or None)) that are not finite numbers of that kind (an ``int`` key takes integers only) or are below
    the minimum; missing or null values pass."""
    import math

    from omegaconf import OmegaConf

    for key, (kind, minimum) in rules.items():
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        number = isinstance(value, int if kind is int else (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or (minimum is not None and value < minimum):
            what = "a whole number" if kind is int else "a number"
            raise ValueError(f"{key}={value}: give {what}" + (f" >= {minimum:g}" if minimum is not None else ""))


def resolve_device(name: str, option: str = "device"):
    """The ``torch.device`` of a command line's device setting: ``auto`` is a GPU when there is one, else the CPU;
    a name torch does not know, or a GPU this machine lacks, is a one-line error naming ``option``."""
    import torch

    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    except (RuntimeError, TypeError):
        raise ValueError(f"{option}={name}: not a device (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise ValueError(f"{option}={name}: this machine has {torch.cuda.device_count()} CUDA device(s); use "
                         f"{option}=cpu or {option}=auto")
    return device


def parse_bool(value: str) -> bool:
    """``true/1/yes`` or ``false/0/no`` (any case); anything else is a ValueError."""
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise ValueError(value)


def one_line_error(e: BaseException) -> str | None:
    """The one-line message of an error caused by the user's config or data, else None.

    Errors raised in a constructor that Hydra instantiates come wrapped; their cause is unwrapped and
    the config key named (a TypeError there is the config's arguments: an unknown or missing one). Missing config
    values name their key.
    """
    from hydra.errors import InstantiationException
    from omegaconf.errors import MissingMandatoryValue

    user = (UserError, ValueError, KeyError, FileNotFoundError)
    if isinstance(e, InstantiationException) and isinstance(e.__cause__, (*user, ImportError, TypeError)):
        where = [ln.split(":", 1)[1].strip() for ln in str(e).splitlines() if ln.startswith("full_key:")]
        inner = one_line_error(e.__cause__) or str(e.__cause__)
        return f"{inner} (config: {where[0]})" if where else inner
    if isinstance(e, MissingMandatoryValue):
        return f"missing mandatory value {e.full_key}: give it on the command line, e.g. {e.full_key}=..."
    if isinstance(e, user):
        return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return None


def _printed(e: BaseException, log: bool) -> bool:
    """Whether ``e`` was a user error, now printed as ``error: <one line>`` (and logged, with ``log``); never with
    ``HYDRA_FULL_ERROR=1``, which asks for the traceback."""
    msg = one_line_error(e)
    if msg is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
        return False
    if log:  # into the run's log file too
        logging.getLogger("diffusion_train").error("%s", msg)
    print(f"error: {msg}", file=sys.stderr)
    return True


@contextlib.contextmanager
def user_errors_as_one_line() -> Iterator[None]:
    """Hydra entry points: a bad config or bad data exits with ``error: <one line>`` (code 1), also in the log."""
    try:
        yield
    except Exception as e:
        if not _printed(e, log=True):
            raise
        sys.exit(1)


def run_main(body: Callable[[list[str]], Any], argv: list[str] | None = None) -> int:
    """A script's exit status for ``body(argv)`` (``argv``: the command line when None): 0 when it
    returns; 1 with one ``error:`` line for a user error (bad argument, config or data)."""
    try:
        body(list(sys.argv[1:] if argv is None else argv))
    except Exception as e:
        if not _printed(e, log=False):
            raise
        return 1
    return 0


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units)."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)
