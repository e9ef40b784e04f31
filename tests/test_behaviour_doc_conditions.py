"""docs/server-behavior.md documents every condition on purpose the code has.

The lists come from the code, not from this file: the settings of
`echoplex.conditions.Conditions` (their control API names, which echo they change),
the options `echoplex serve` declares in the conditions and control API sections of
`ServerConfig`, how the config hands each option to a setting, the outcomes of a
connection ended on purpose, the UDP drop reasons the conditions add, and the actions
of `echoplex conditions`. A new condition without its documentation fails here.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from echoplex import config as config_module
from echoplex import udp
from echoplex._cli_util import options_of
from echoplex.commands.conditions import METHODS
from echoplex.conditions import CLOSE_AFTER, RESET_AFTER, Conditions, _settings
from echoplex.config import CONDITIONS, CONTROL, ServerConfig

DOCUMENT = Path(__file__).parent.parent / "docs" / "server-behavior.md"
SECTION = "## Conditions on purpose"
UDP_PART = "### Over UDP"


def part(text: str, heading: str) -> str:
    """From `heading` to the next heading of its level or above (the end: the rest)."""
    level = heading.split(" ")[0]
    start = text.index(f"\n{heading}\n")
    ends = [
        match.start()
        for match in re.finditer(r"\n(#+) ", text[start + 1 :])
        if len(match[1]) <= len(level)
    ]
    return text[start : start + 1 + ends[0]] if ends else text[start:]


@pytest.fixture(scope="module")
def section() -> str:
    text = DOCUMENT.read_text()
    assert f"\n{SECTION}\n" in text, f"docs/server-behavior.md has no {SECTION!r}"
    return part(text, SECTION)


def table_rows(text: str) -> dict[str, set[str]]:
    """The section's table of settings: the flags of each row's first cell (`--work
    io:D`, `--work cpu:D`), by the API name in its second."""
    rows: dict[str, set[str]] = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`--"):
            continue
        names = re.findall(r"^`(\w+)`$", cells[1])
        if names:
            rows.setdefault(names[0], set()).update(re.findall(r"`(--[\w-]+)", cells[0]))
    return rows


def flag_of_each_setting(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Each setting's API name -> the `echoplex serve` flag that sets it, as the config
    hands its fields to `Conditions` (each field given a marker, the call recorded)."""
    handed: dict[str, Any] = {}
    monkeypatch.setattr(config_module, "Conditions", lambda **given: handed.update(given))
    config = object.__new__(ServerConfig)
    markers = {}
    for config_field, declared in options_of(ServerConfig):
        marker = object()
        markers[id(marker)] = declared.flag
        object.__setattr__(config, config_field.name, marker)
    ServerConfig._resolve_conditions(config)
    by_field = {f.name: setting.name for f, setting in _settings()}
    assert set(handed) == set(by_field), "the config hands every setting, and only those"
    return {by_field[name]: markers[id(marker)] for name, marker in handed.items()}


def test_every_setting_has_a_row_with_its_flag_and_api_name(
    section: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = table_rows(section)
    for name, flag in flag_of_each_setting(monkeypatch).items():
        assert name in rows, f"the {SECTION!r} table has no row for `{name}`"
        assert flag in rows[name], f"the row of `{name}` does not name {flag}"
    known = {setting.name for _, setting in _settings()}
    assert set(rows) <= known, f"rows for settings the code does not have: {set(rows) - known}"


def test_every_conditions_and_control_option_is_named(section: str) -> None:
    for config_field, declared in options_of(ServerConfig):
        if declared.group in (CONDITIONS, CONTROL):
            assert f"`{declared.flag}" in section, (
                f"{SECTION!r} does not name {declared.flag} (ServerConfig.{config_field.name})"
            )


def test_the_udp_part_names_what_changes_a_datagrams_answer(
    section: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    udp_part = part(section, UDP_PART)
    flags = flag_of_each_setting(monkeypatch)
    for _, setting in _settings():
        if setting.applies in ("udp", "both"):
            assert f"`{flags[setting.name]}`" in udp_part, (
                f"{UDP_PART!r} does not name {flags[setting.name]}"
            )
    for reason in (udp.DROP, udp.HELD, udp.STOPPED):
        assert f"`{reason}`" in udp_part, f"{UDP_PART!r} does not name the drop `{reason}`"


def test_the_ends_on_purpose_and_the_client_command_are_named(section: str) -> None:
    for outcome in (CLOSE_AFTER, RESET_AFTER):
        assert f"outcome `{outcome}`" in section, f"{SECTION!r} does not name `{outcome}`"
    assert "`echoplex conditions" in section
    for action in METHODS:
        assert re.search(rf"\b{action}\b", section), f"`echoplex conditions {action}` is missing"


def test_the_table_reader_sees_a_missing_row() -> None:
    # The check above must be able to fail: a table without the `latency` row lacks it.
    table = "| `--latency D` | `latency` | x |\n| `--jitter D` | `jitter` | y |\n"
    assert table_rows(table) == {"latency": {"--latency"}, "jitter": {"--jitter"}}
    assert "latency" not in table_rows(table.splitlines()[1])


def test_every_field_of_conditions_is_a_setting_these_checks_see() -> None:
    # `_settings` is how the code itself lists the settings (the API's names, `reader`):
    # a field added without one would escape the checks above.
    fields = {f.name for f in dataclasses.fields(Conditions) if f.init}
    assert {f.name for f, _ in _settings()} == fields
