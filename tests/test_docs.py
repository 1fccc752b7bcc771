"""Every command has help text and a README section; `--help` works for each."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from evtool.cli import cli

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def commands(group: click.Group = cli, prefix: str = "") -> list[tuple[str, click.Command]]:
    out = []
    for name, cmd in sorted(group.commands.items()):
        out.append((f"{prefix}{name}", cmd))
        if isinstance(cmd, click.Group):
            out += commands(cmd, f"{prefix}{name} ")
    return out


@pytest.mark.parametrize("name, cmd", commands(), ids=[n for n, _ in commands()])
def test_command_has_help_and_readme_section(name, cmd):
    assert (cmd.help or "").strip(), f"evtool {name} has no help text"
    for param in cmd.params:
        if isinstance(param, click.Option) and not param.hidden:
            assert param.help, f"evtool {name} {param.opts[0]} has no help text"
    top, *sub = name.split()
    assert f"`evtool {top}" in README, f"evtool {top} is not in README.md"
    if sub:
        heading = README.split(f"`evtool {top}", 1)[1].split("\n", 1)[0]
        assert sub[0] in heading, f"evtool {name} is not in README.md"
    result = CliRunner().invoke(cli, [*name.split(), "--help"])
    assert result.exit_code == 0 and "Usage: " in result.output
