"""statemachines/source.py: YAML errors as located ConfigErrors with a way out."""

from __future__ import annotations

from pathlib import Path

import pytest

from statemachines.device import load_device
from statemachines.source import ConfigErrors, parse_yaml


def only_error(text: str) -> tuple[int, str]:
    with pytest.raises(ConfigErrors) as caught:
        parse_yaml(text, "f.yaml")
    (error,) = caught.value.errors
    return error.line, error.message


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("commands:\n  a: {from: *, to: idle}\n", 2),
        ("commands:\n  a:\n    from: *\n    to: idle\n", 3),
        ("from: [*]\n", 1),
        ("on_error:\n  *: failed\n", 2),
    ],
)
def test_an_unquoted_star_says_quote_it(text: str, line: int) -> None:
    assert only_error(text) == (
        line,
        'invalid YAML: a bare * starts a YAML alias: quote it, as "*"',
    )


def test_an_undefined_alias_says_quote_it_too() -> None:
    line, message = only_error("a: 1\nb: *idle\n")
    assert line == 2
    assert "undefined alias 'idle'" in message and "quote it" in message


def test_other_yaml_errors_keep_their_reason() -> None:
    line, message = only_error("a: [1, 2\n")
    assert message.startswith("invalid YAML:") and "quote it" not in message and line >= 1


def test_an_unquoted_star_in_a_device_config(tmp_path: Path) -> None:
    path = tmp_path / "d.yaml"
    path.write_text("device: d\nstates: [idle]\ncommands:\n  ping: {from: *, to: idle}\n")
    with pytest.raises(ConfigErrors, match=r'd\.yaml:4: invalid YAML: .*quote it, as "\*"'):
        load_device(path)
