"""What the bundle does with what users give it: a bad input is one line, and text is never run as code.

``UserInputError`` is the one exception type for a wrong file, field or value; its message is one line naming it
and what was expected. Entry points show only that line and exit with status 1: ``tumsyn`` catches it, and under
``python -m monai.bundle run`` an excepthook prints it (MONAI wraps errors raised inside config expressions in
``RuntimeError``; the hook finds the user error behind it). The hook is installed by ``check_bundle_run``, which the
first bundle function a config runs calls; importing the bundle changes nothing in MONAI or ``sys``.

MONAI's config parser runs an override value as Python when it starts with ``$``, replaces ``@id`` and ``%file#id``
values with other config or file content, and instantiates any ``_target_`` a dict names (``fire`` turns a ``{...}``
argument into a dict): overrides are config code, a trust boundary the user owns (docs/usage.md). The ids in
``TEXT_FIELDS`` are free text, so config syntax there is a mistake or an attack: under ``python -m monai.bundle run``
``check_bundle_run`` refuses it in one line before any item using it is evaluated, and ``tumsyn`` hands such fields
to MONAI as string literals (``scripts.cli``), so any text stays literal there.

Messages stay short: a quoted user value is cut to ``_QUOTE_CHARS`` (``quoted``), a whole message to
``MAX_MESSAGE_CHARS`` (its middle elided), so one line on a terminal names the file or field and what was expected.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from typing import Any

# Top-level config ids whose values are user text or paths (never expressions or components); every config that
# has them defaults them to null, so no shipped expression sits under them.
TEXT_FIELDS = ("prompt", "input_modality", "input_image", "reference", "datalist")

# Characters of an offending value quoted in an error message.
_QUOTE_CHARS = 80
# Longest error message: longer ones keep their head (the file or field) and tail (what was expected).
MAX_MESSAGE_CHARS = 300


def quoted(value: Any, limit: int = _QUOTE_CHARS) -> str:
    """``repr(value)``, cut to ``limit`` characters (a 10,000-character prompt is not echoed whole)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...(" + str(len(text)) + " characters)"


def bounded(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``message`` on one line and at most ``limit`` characters: the middle of a longer one is elided."""
    message = " ".join(str(message).splitlines())
    if len(message) <= limit:
        return message
    tail = limit // 3
    return message[: limit - tail - 5] + " ... " + message[-tail:]


class UserInputError(ValueError):
    """Something the user gave (a file, a config field, a prompt) is wrong: a one-line message naming it and what
    was expected, bounded to ``MAX_MESSAGE_CHARS``. A ``ValueError``, so callers that handle bad values keep handling
    it."""

    def __init__(self, message: Any = "", *rest: Any):
        super().__init__(bounded(message), *rest)


_FLAG_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def config_flag(value: Any, key: str) -> bool:
    """A yes/no config value as a bool. ``fire`` passes ``--key false`` through as the string ``'false'`` (only
    ``False`` becomes a bool), which Python would read as true; the usual spellings are accepted, anything else is
    one error line naming ``key``."""
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word not in _FLAG_WORDS:
        raise UserInputError(f"{key}: expected true or false, got {str(value)[:_QUOTE_CHARS]!r}")
    return _FLAG_WORDS[word]


def config_positive_numbers(value: Any, key: str, alternative: str = "") -> tuple[float, ...]:
    """A config list of positive numbers as floats. A list comes from YAML, a string from the command line or a
    MONAI Label request (``"[0.6, 1, 2]"`` or ``"0.6, 1, 2"``), a single number stands for a list of one; anything
    else (empty, not a number, zero, negative, infinite) is one error line naming ``key`` (and the ``alternative``
    value the caller also accepts)."""
    numbers = value
    if isinstance(value, str):
        text = value.strip()
        try:
            numbers = json.loads(text if text.startswith("[") else f"[{text}]")
        except json.JSONDecodeError:
            numbers = None
    elif isinstance(value, (int, float)):
        numbers = [value]
    valid = isinstance(numbers, (list, tuple)) and len(numbers) > 0 and all(
        isinstance(n, (int, float)) and not isinstance(n, bool) and math.isfinite(n) and n > 0 for n in numbers)
    if not valid:
        raise UserInputError(f"{key}: expected a list of positive numbers such as [0.6, 1, 2]"
                             f"{f' or {alternative!r}' if alternative else ''}, got "
                             f"{str(value)[:_QUOTE_CHARS]!r}")
    return tuple(float(n) for n in numbers)


def config_null(value: Any) -> Any:
    """``value``, or None for the words ``null``/``none`` (any case): ``fire`` passes ``--key null`` through as the
    string ``'null'`` (only ``None`` becomes None), where the configs document ``null``."""
    return None if isinstance(value, str) and value.strip().lower() in ("null", "none") else value


def one_line(error: BaseException) -> str:
    """``Type: first line of the message`` of a library's exception, to quote inside a one-line error."""
    lines = str(error).strip().splitlines()
    return f"{error.__class__.__name__}: {lines[0]}" if lines else error.__class__.__name__


def user_error(error: BaseException | None) -> UserInputError | None:
    """The ``UserInputError`` behind ``error``, following explicit causes (``raise ... from``) as MONAI wraps."""
    while error is not None:
        if isinstance(error, UserInputError):
            return error
        error = error.__cause__
    return None


def _install_excepthook() -> None:
    """Print an uncaught user error as ``error: <message>`` (one line, exit status 1); anything else as before."""
    previous = sys.excepthook
    if getattr(previous, "prints_user_errors", False):
        return

    def hook(kind, value, traceback):
        found = user_error(value)
        if found is None:
            previous(kind, value, traceback)
        else:
            print(f"error: {found}", file=sys.stderr)

    hook.prints_user_errors = True
    sys.excepthook = hook


def _is_monai_bundle_command(argv: list[str]) -> bool:
    return bool(argv) and os.path.normpath(str(argv[0])).endswith(os.path.join("monai", "bundle", "__main__.py"))


def command_line_text_fields(argv: list[str]) -> dict[str, str]:
    """The raw values of ``TEXT_FIELDS`` on a command line, as ``fire`` reads them (``--prompt X``, ``--prompt=X``,
    ``-prompt X``; ``-`` and ``_`` alike in names)."""
    found = {}
    for position, word in enumerate(argv):
        if not word.startswith("-"):
            continue
        name, equals, value = word.lstrip("-").partition("=")
        name = name.replace("-", "_")
        if name in TEXT_FIELDS:
            if equals:
                found[name] = value
            elif position + 1 < len(argv):
                found[name] = argv[position + 1]
    return found


# A relative id (`@#x`, `%::x`), which MONAI's parser rewrites wherever it stands in a string.
_RELATIVE_ID = re.compile(r"[@%](#|::)")


def _config_syntax(value: Any) -> str | None:
    """What MONAI's parser would do with ``value`` (as ``fire`` passed it) instead of keeping it as text, or None."""
    if isinstance(value, (dict, list)):
        return f"be read as config content (fire turns it into a {type(value).__name__})"
    if not isinstance(value, str):
        return None
    if value.startswith("$"):
        return "run as Python code"
    if value.startswith("%"):
        return "be replaced by other file or config content (a '%' macro)"
    if value.startswith("@"):
        return "be replaced by another config item (an '@' reference)"
    if _RELATIVE_ID.search(value):
        return "be rewritten as a relative config id ('@#', '%#')"
    return None


def text_field_refusals(argv: list[str]) -> dict[str, str]:
    """The one-line refusal per text field whose value on a ``python -m monai.bundle run`` command line is config
    syntax (``$`` code, an ``@`` reference, a ``%`` macro, a relative id, a dict or list); empty for other commands.

    The refusal quotes the value as typed, never what MONAI replaced it with (``%secret.json#key``)."""
    from fire.parser import DefaultParseValue

    if not _is_monai_bundle_command(argv):
        return {}
    refusals = {}
    for field, raw in command_line_text_fields(argv).items():
        value = DefaultParseValue(raw)  # what fire hands MONAI: '"$x"' is the expression $x
        effect = _config_syntax(value)
        if effect is not None:
            refusals[field] = (f"{field}: {quoted(value)} would {effect} in `python -m monai.bundle run`; a {field} "
                               f"is plain text (`tumsyn` passes any text as given)")
    return refusals


def check_bundle_run(argv: list[str] | None = None) -> None:
    """What ``python -m monai.bundle run`` needs from the bundle, for the first bundle function a config runs to call
    (never done on import); under any other program (``tumsyn``, MONAI Label, Python) it does nothing.

    - A user error raised inside a config expression, which MONAI wraps in ``RuntimeError``, ends as the one line
      ``error: <message>`` with exit status 1 (an excepthook that finds the ``UserInputError`` behind it).
    - A text field given on the command line as config syntax is refused in one line (``text_field_refusals``) before
      any config item that uses it is evaluated. (MONAI itself imports the module of a ``$import ...`` value, in any
      item, before the first bundle function runs: overrides are trusted code.)
    """
    argv = sys.argv if argv is None else argv
    if not _is_monai_bundle_command(argv):
        return
    _install_excepthook()
    refusals = text_field_refusals(argv)
    if refusals:
        raise UserInputError(next(iter(refusals.values())))
