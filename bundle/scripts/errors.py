"""What the bundle does with what users give it: a bad input is one line, and text is never run as code.

``UserInputError`` is the one exception type for a wrong file, field or value; its message is one line naming it
and what was expected. Entry points show only that line and exit with status 1: ``tumsyn`` catches it, and for
``python -m monai.bundle run`` the excepthook installed when ``scripts`` is imported prints it (MONAI wraps errors
raised inside config expressions in ``RuntimeError``; the hook finds the user error behind it).

MONAI's config parser runs an override value as Python when it starts with ``$`` (and instantiates any ``_target_``
a dict names; ``fire`` turns a ``{...}`` argument into a dict), so ``--prompt '$__import__("os").system(...)'``
would run the command. ``guard_text_fields`` makes MONAI refuse to evaluate or instantiate any config item under
the ids in ``TEXT_FIELDS``: a prompt is data, and such a value ends as one ``UserInputError`` line before any of it
runs. ``@id`` and ``%file#id`` values would be references to other config content: under ``guard_text_fields``
they stay literal text. ``python -m monai.bundle run`` expands ``%`` macros and ``@#`` relative ids of its command
line before any bundle code runs (the guard is installed when the config imports ``scripts``), so there such a text
override is refused in one line at its first use instead of reaching the bundle as another file's content
(``refuse_expanded_overrides``).

Messages stay short: a quoted user value is cut to ``_QUOTE_CHARS`` (``quoted``), a whole message to
``MAX_MESSAGE_CHARS`` (its middle elided), so one line on a terminal names the file or field and what was expected.
"""

from __future__ import annotations

import functools
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


def install_excepthook() -> None:
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


def _text_field(item_id: str) -> str | None:
    top = item_id.replace("::", "#").split("#", 1)[0]
    return top if top in TEXT_FIELDS else None


def _refuse_code(item: Any) -> None:
    field = _text_field(item.get_id())
    if field is not None:
        value = quoted(item.get_config())
        raise UserInputError(f"{field}: {value} would run as code in MONAI's config parser (a value starting with "
                             f"'$' or a dict with '_target_'); a {field} is plain text, e.g. 'T2w' or the official "
                             f"template")


# What MONAI's parser does to an override before the bundle's code runs: a `%` macro at the start, a relative id
# (`@#x`, `%::x`) anywhere.
_EXPANDED_EARLY = re.compile(r"^%|[@%](#|::)")


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


def refuse_expanded_overrides(argv: list[str]) -> dict[str, str]:
    """The one-line refusal per text field whose command-line value ``python -m monai.bundle run`` has already
    replaced (``%file#key``, ``@#id``) before any bundle code could keep it literal; empty for other commands.

    ``tumsyn`` installs the guard before MONAI parses, so there such text stays literal."""
    if not _is_monai_bundle_command(argv):
        return {}
    return {field: (f"{field}: {quoted(value)} holds a MONAI macro or relative reference ('%...', '@#...'), which "
                    f"`python -m monai.bundle run` replaces with other config or file content before the bundle "
                    f"reads it; a {field} is plain text (`tumsyn infer` keeps it literal)")
            for field, value in command_line_text_fields(argv).items() if _EXPANDED_EARLY.search(value)}


def guard_text_fields() -> None:
    """Make MONAI's config parser refuse to evaluate or instantiate anything under ``TEXT_FIELDS``, and keep their
    ``@reference`` / ``%macro`` strings as literal text instead of substituting other config content (idempotent).

    Where MONAI expanded a text override before this ran (``refuse_expanded_overrides``), the first use of that
    field is refused in one line."""
    from monai.bundle.config_item import ConfigComponent, ConfigExpression
    from monai.bundle.config_parser import ConfigParser
    from monai.bundle.reference_resolver import ReferenceResolver

    if getattr(ConfigExpression.evaluate, "guards_text_fields", False):
        return
    refusals = refuse_expanded_overrides(sys.argv)
    resolve_item = ReferenceResolver._resolve_one_item

    @functools.wraps(resolve_item)
    def refusing_resolve_item(self, id, waiting_list=None, **kwargs):
        field = _text_field(str(id))
        if field in refusals:
            raise UserInputError(refusals[field])
        return resolve_item(self, id, waiting_list, **kwargs)

    if refusals:
        ReferenceResolver._resolve_one_item = refusing_resolve_item
    evaluate, instantiate = ConfigExpression.evaluate, ConfigComponent.instantiate
    resolve_macros = ConfigParser._do_resolve
    find_refs, substitute_refs = ReferenceResolver.find_refs_in_config, ReferenceResolver.update_config_with_refs

    def literal_text(config: Any, item_id: str) -> bool:
        return isinstance(config, str) and _text_field(item_id) is not None

    @functools.wraps(resolve_macros)
    def text_kept_resolve(self, config, id=""):
        return config if literal_text(config, id) else resolve_macros(self, config, id)

    @functools.wraps(find_refs)
    def text_kept_find_refs(config, id, refs=None):
        return (refs or {}) if literal_text(config, id) else find_refs(config, id, refs)

    @functools.wraps(substitute_refs)
    def text_kept_substitute(config, id, refs=None):
        return config if literal_text(config, id) else substitute_refs(config, id, refs)

    ConfigParser._do_resolve = text_kept_resolve
    ReferenceResolver.find_refs_in_config = staticmethod(text_kept_find_refs)
    ReferenceResolver.update_config_with_refs = staticmethod(text_kept_substitute)

    @functools.wraps(evaluate)
    def guarded_evaluate(self, globals=None, locals=None):
        _refuse_code(self)
        return evaluate(self, globals, locals)

    @functools.wraps(instantiate)
    def guarded_instantiate(self, **kwargs):
        _refuse_code(self)
        return instantiate(self, **kwargs)

    guarded_evaluate.guards_text_fields = True
    ConfigExpression.evaluate, ConfigComponent.instantiate = guarded_evaluate, guarded_instantiate
