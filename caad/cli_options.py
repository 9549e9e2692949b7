"""Options of the ``caad`` commands: flags with real defaults in ``--help``, and a validated ``--config`` file.

Each option is declared once with :func:`add_option`: its default is shown in ``--help`` and recorded on the
argparse action (argparse itself gets ``None``, so that a flag given on the command line can be told apart
from one that was not). :func:`resolve` merges, in this order of precedence, the command line, the YAML/JSON
``--config`` file and the defaults; the file is checked up front against the same types, ranges and choices
as the flags (a key that is not an option, a value of the wrong type, a syntax error: one :class:`CLIError`
naming the file and the option).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cli_errors import CLIError

_NO_DEFAULT = object()


# -- value types (used by argparse for flags and by the config check for file values) ----------------------------


def _number(kind: type, value: Any) -> Any:
    if isinstance(value, bool):
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = kind(value.strip()) if kind is int else float(value.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {value!r}") from None
    elif kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if kind is int and not isinstance(value, int):
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}")
    if not isinstance(value, (int, float)):
        raise argparse.ArgumentTypeError(f"expected a number, got {type(value).__name__} {value!r}")
    if kind is float:
        value = float(value)
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {value!r}")
    return value


def real(value: Any) -> float:
    """A finite number."""
    return _number(float, value)


def positive_real(value: Any) -> float:
    """A finite number > 0."""
    v = _number(float, value)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {v!r}")
    return v


def nonnegative_real(value: Any) -> float:
    """A finite number >= 0."""
    v = _number(float, value)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {v!r}")
    return v


def integer(value: Any) -> int:
    """An integer."""
    return _number(int, value)


def positive_int(value: Any) -> int:
    """An integer > 0."""
    v = _number(int, value)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected an integer > 0, got {v!r}")
    return v


def text(value: Any) -> str:
    """A string (a number or a mapping in the config file is refused, not converted)."""
    if not isinstance(value, str):
        raise argparse.ArgumentTypeError(f"expected a string, got {type(value).__name__} {value!r}")
    return value


# -- declaring options --------------------------------------------------------------------------------------------


def add_option(parser: argparse.ArgumentParser | Any, *flags: str, help: str, default: Any = None,
               kind: Any = text, choices: list[str] | None = None, flag: bool = False,
               required: str | None = None, metavar: str | None = None) -> argparse.Action:
    """Add one option whose real ``default`` is shown in ``--help`` and used by :func:`resolve`.

    ``kind`` checks and converts a value (from the command line or the config file); ``flag=True`` makes a
    boolean ``--x/--no-x``; ``required`` is the condition shown in the help (e.g. ``"always"``, ``"with --data"``),
    checked by the command.
    """
    shown = help
    if required:
        shown += " [required]" if required == "always" else f" [required {required}]"
    if default is not None and default is not False:
        shown += f" (default: {default})"
    shown = shown.replace("%", "%%")  # argparse %-formats help strings
    if flag:
        action = parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=None, help=shown)
        action.caad_kind = _boolean
    else:
        action = parser.add_argument(*flags, type=kind, choices=choices, default=None, help=shown, metavar=metavar)
        action.caad_kind = kind
    action.caad_default = default
    return action


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
    return value


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The parser's options that a config file may set (every one declared with a value, --config excluded)."""
    return {a.dest: a for a in parser._actions  # argparse has no public accessor for its actions
            if a.option_strings and a.dest not in ("help", "config", "debug", "version")}


# -- the config file ----------------------------------------------------------------------------------------------


def load_config(path: str | None) -> dict[str, Any]:
    """The mapping in a YAML (``.yaml``/``.yml``) or JSON config file; keys with ``-`` become ``_``."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"--config {path}: no such file")
    try:
        content = p.read_text(encoding="utf-8-sig")  # -sig: a UTF-8 byte-order mark is not content
    except UnicodeDecodeError as exc:
        raise CLIError(f"--config {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError as exc:
            raise CLIError(f"--config {path}: reading YAML needs PyYAML (pip install pyyaml), or use JSON") from exc
        try:
            data = yaml.safe_load(content)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc)
            raise CLIError(f"--config {path}: invalid YAML{where}: {problem}") from exc
    else:
        try:
            data = json.loads(content)
        except json.JSONDecodeError as exc:
            raise CLIError(f"--config {path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg} "
                           "(YAML files must end in .yaml or .yml)") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CLIError(f"--config {path}: must hold a mapping of option names to values, got {type(data).__name__}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise CLIError(f"--config {path}: option names must be strings, got {key!r}")
        out[key.replace("-", "_")] = value
    return out


def check_config(config: dict[str, Any], parser: argparse.ArgumentParser, path: str | None,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check every config value against the option's type and choices; return the converted values.

    ``extra`` holds option names (with defaults) the command accepts without a flag; they are not type-checked.
    """
    options = _options(parser)
    accepted = set(options) | set(extra or {})
    unknown = sorted(set(config) - accepted)
    if unknown:
        raise CLIError(f"--config {path}: unknown option(s) {', '.join(unknown)} "
                       f"(options of this command: {', '.join(sorted(accepted))})")
    out = {}
    for key, value in config.items():
        action = options.get(key)
        if action is None:
            out[key] = value
            continue
        kind = getattr(action, "caad_kind", None) or action.type or text
        try:
            converted = kind(value)
        except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
            raise CLIError(f"--config {path}: option {key}: {exc}") from exc
        if action.choices is not None and converted not in action.choices:
            raise CLIError(f"--config {path}: option {key}: expected one of {', '.join(map(str, action.choices))}, "
                           f"got {converted!r}")
        out[key] = converted
    return out


@dataclass
class Resolved:
    """The merged options of one command and which of them the user gave (command line or config file)."""

    values: dict[str, Any]
    given: set[str] = field(default_factory=set)

    def __getitem__(self, key: str) -> Any:
        return self.values[key]


def resolve(args: argparse.Namespace, parser: argparse.ArgumentParser,
            extra: dict[str, Any] | None = None) -> Resolved:
    """Command line > config file > defaults, for every option of ``parser`` (plus ``extra`` names)."""
    path = getattr(args, "config", None)
    config = check_config(load_config(path), parser, path, extra)
    values = {dest: getattr(action, "caad_default", action.default) for dest, action in _options(parser).items()}
    values.update(extra or {})
    given = set(config)
    values.update(config)
    for key in values:
        v = getattr(args, key, None)
        if v is not None:
            values[key] = v
            given.add(key)
    return Resolved(values, given)
