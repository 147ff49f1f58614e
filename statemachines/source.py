"""Safe YAML loading that remembers line numbers, and the ``file:line: message`` error type.

Every config problem a user can make is reported as a :class:`ConfigError` that points at the
line to fix. Loading uses ``yaml.SafeLoader`` only: no Python objects are ever constructed.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml


class ConfigError(Exception):
    """One problem in a config file, located as ``file:line``."""

    def __init__(self, file: str, line: int, message: str) -> None:
        super().__init__(f"{file}:{line}: {message}")
        self.file = file
        self.line = line
        self.message = message


class ConfigErrors(Exception):
    """All the problems found in one or more config files (at least one)."""

    def __init__(self, errors: Iterable[ConfigError]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(str(e) for e in self.errors))


class LineDict(dict):
    """A mapping from YAML that knows its own line and the line of each key."""

    line: int = 0
    key_lines: dict[Any, int]

    def line_of(self, key: Any) -> int:
        return self.key_lines.get(key, self.line)


class LineList(list):
    """A sequence from YAML that knows its own line and the line of each item."""

    line: int = 0
    item_lines: list[int]

    def line_of(self, index: int) -> int:
        return self.item_lines[index] if 0 <= index < len(self.item_lines) else self.line


def line_of(node: Any, key: Any = None) -> int:
    """Best line for ``node`` (or ``node[key]``); 0 when the value did not come from YAML."""
    if key is not None and isinstance(node, (LineDict, LineList)):
        return node.line_of(key)
    return getattr(node, "line", 0)


class _LineLoader(yaml.SafeLoader):
    """SafeLoader whose mappings and sequences carry 1-based line numbers."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> LineDict:
        mapping = LineDict()
        mapping.line = node.start_mark.line + 1
        mapping.key_lines = {}
        self.flatten_mapping(node)
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, "found an unhashable key", key_node.start_mark
                )
            if key in mapping:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            mapping[key] = self.construct_object(value_node, deep=True)
            mapping.key_lines[key] = key_node.start_mark.line + 1
        return mapping

    def construct_sequence(self, node: yaml.SequenceNode, deep: bool = False) -> LineList:
        seq = LineList(self.construct_object(child, deep=True) for child in node.value)
        seq.line = node.start_mark.line + 1
        seq.item_lines = [child.start_mark.line + 1 for child in node.value]
        return seq


_LineLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _LineLoader.construct_mapping
)
_LineLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _LineLoader.construct_sequence
)


def parse_yaml(text: str, file: str = "<string>") -> Any:
    """Parse YAML text safely; syntax errors become :class:`ConfigErrors` with a line."""
    try:
        return yaml.load(text, Loader=_LineLoader)  # noqa: S506 - _LineLoader is a SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        reason = _alias_hint(exc) or exc.problem or exc.context or "invalid YAML"
        raise ConfigErrors([ConfigError(file, line, f"invalid YAML: {reason}")])
    except yaml.YAMLError as exc:
        raise ConfigErrors([ConfigError(file, 1, f"invalid YAML: {exc}")])


def _alias_hint(exc: yaml.MarkedYAMLError) -> str:
    """The reason to give for a ``*`` that YAML took for an alias (``from: *`` unquoted), or
    ``""`` for any other error."""
    if exc.context == "while scanning an alias":
        return 'a bare * starts a YAML alias: quote it, as "*"'
    if (exc.problem or "").startswith("found undefined alias"):
        return f'{exc.problem} (a value starting with * is a YAML alias: quote it, as "*...")'
    return ""


def read_source(path: str | Path) -> str:
    """A config file's text; an unreadable file is a :class:`ConfigErrors` at line 1."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigErrors([ConfigError(str(path), 1, f"cannot read the file: {exc}")])


def load_yaml(path: str | Path) -> Any:
    """Read and parse a YAML file; an unreadable file is a :class:`ConfigErrors` at line 1."""
    return parse_yaml(read_source(path), str(path))


def yaml_bool_hint(value: Any, what: str = "it") -> str:
    """The one hint for a value YAML 1.1 read as a boolean where a name was wanted: ``""``
    unless ``value`` is a bool, else `` (YAML reads bare on/off/... as booleans: quote it)``
    (``what``: what to quote, e.g. "the name")."""
    if not isinstance(value, bool):
        return ""
    return f" (YAML reads bare on/off/yes/no/true/false as booleans: quote {what})"


def describe_type(value: Any) -> str:
    """A value's type in words for error messages: "a string", "an integer", "a list", ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def suggest(word: Any, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` (same letters first), or ``""``."""
    options = [str(c) for c in choices]
    same = [c for c in options if c.lower() == str(word).lower()]
    close = same or difflib.get_close_matches(str(word), options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
