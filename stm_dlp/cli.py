"""Tiny shared helpers for the ``key=value`` command lines (synth, predict, calc).

* :func:`parse_kv` turns ``["out=DIR", "patients=4"]`` into typed values, rejecting unknown keys.
* :func:`run_cli` runs a main function and turns a user-facing error into one line on stderr
  (``error: ...``) and exit status 2, as DESIGN.md's conventions ask.
"""

from __future__ import annotations

import pickle
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from stm_dlp.types import StudyError

#: ``name -> (type, default, help)``. A default of :data:`REQUIRED` makes the key mandatory.
Spec = Mapping[str, tuple[Callable[[str], Any] | type, Any, str]]


class _Required:
    def __repr__(self) -> str:
        return "<required>"


REQUIRED: Any = _Required()

_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f"}


def parse_bool(text: str) -> bool:
    """``true/false/yes/no/on/off/1/0`` (any case) → bool; anything else is a ValueError."""
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def usage(spec: Spec, prog: str = "") -> str:
    """A help text listing every key, its type, default and meaning."""
    lines = [f"usage: {prog} key=value ..." if prog else "usage: key=value ...", ""]
    width = max((len(k) for k in spec), default=0)
    for key, (typ, default, text) in spec.items():
        tname = getattr(typ, "__name__", "value")
        if typ is parse_bool:
            tname = "bool"
        dflt = "required" if default is REQUIRED else f"default {default!r}"
        lines.append(f"  {key.ljust(width)}  {tname}, {dflt}: {text}")
    return "\n".join(lines)


def parse_kv(argv: Sequence[str], spec: Spec, prog: str = "") -> dict[str, Any]:
    """Parse ``key=value`` arguments against ``spec``.

    Args:
        argv: the arguments (without the program name).
        spec: ``name -> (type, default, help)``; ``type`` is called on the text (``bool`` is read
            as true/false/yes/no/1/0). A default of :data:`REQUIRED` makes the key mandatory.
        prog: program name for the help text.

    Returns:
        Every key of ``spec`` mapped to its parsed value or default.

    Raises:
        ValueError: an argument without ``=``, an unknown key (the message lists the valid keys),
            a repeated key, a value that does not convert, or a missing required key.
        SystemExit(0): for ``help``, ``-h`` or ``--help`` (after printing the usage to stdout).
    """
    valid = ", ".join(spec)
    values: dict[str, Any] = {}
    for arg in argv:
        if arg in ("-h", "--help", "help"):
            print(usage(spec, prog))
            raise SystemExit(0)
        key, sep, text = arg.partition("=")
        key = key.strip().lstrip("-").replace("-", "_") if key.startswith("--") else key.strip()
        if not sep:
            raise ValueError(f"arguments are key=value; got {arg!r} (valid keys: {valid})")
        if key not in spec:
            raise ValueError(f"unknown key {key!r} (valid keys: {valid})")
        if key in values:
            raise ValueError(f"key {key!r} given twice")
        typ = spec[key][0]
        conv = parse_bool if typ is bool else typ
        try:
            values[key] = conv(text)
        except (TypeError, ValueError) as exc:
            tname = "bool" if typ in (bool, parse_bool) else getattr(typ, "__name__", "value")
            raise ValueError(f"{key}={text!r}: expected {tname} ({exc})") from None
    out: dict[str, Any] = {}
    for key, (_typ, default, _help) in spec.items():
        if key in values:
            out[key] = values[key]
        elif default is REQUIRED:
            raise ValueError(f"missing required key {key}=... (valid keys: {valid})")
        else:
            out[key] = default
    return out


def error_line(exc: BaseException) -> str:
    """The exception as one line: ``error: <message>`` (newlines folded)."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, FileNotFoundError) and exc.filename and str(exc.filename) not in text:
        text = f"{text}: {exc.filename}"
    return "error: " + " ".join(text.split())


def run_cli(main_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``main_fn(*args, **kwargs)``; user-facing errors become one stderr line and exit 2.

    :class:`StudyError`, :class:`ValueError` and :class:`OSError` (file not found, permission,
    disk full, ...) print ``error: <message>`` on stderr and raise ``SystemExit(2)``. Anything
    else is a bug and propagates with its traceback. A checkpoint that ``torch.load(weights_only=True)``
    refuses (``pickle.UnpicklingError``) is a user error too. ``KeyboardInterrupt`` exits with 130.
    Returns ``main_fn``'s result on success.
    """
    try:
        return main_fn(*args, **kwargs)
    except (StudyError, ValueError, OSError) as exc:
        print(error_line(exc), file=sys.stderr)
        raise SystemExit(2) from None
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        print(f"error: refused to load the checkpoint ({first})", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
