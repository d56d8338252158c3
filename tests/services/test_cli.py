"""The `flywheel` command: help everywhere, clear exit codes, errors as one line."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from services.cli import friendly_errors, main

pytestmark = pytest.mark.unit


def _all_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix]
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            out += _all_commands(cmd, (*prefix, name))
        else:
            out.append((*prefix, name))
    return out


def test_every_command_has_help() -> None:
    runner = CliRunner()
    commands = _all_commands(main)
    assert len(commands) > 20
    for path in commands:
        result = runner.invoke(main, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Usage:" in result.output
        assert len(result.output.splitlines()) >= 3, path


def test_bad_usage_exits_2() -> None:
    result = CliRunner().invoke(main, ["eval", "--protocol", "P9"])
    assert result.exit_code == 2
    assert "P9" in result.output


def test_user_facing_errors_are_one_line_exit_1() -> None:
    class SetupError(Exception):
        pass

    @click.command()
    @friendly_errors
    def broken() -> None:
        raise SetupError("java not found: install openjdk-17-jre-headless")

    result = CliRunner().invoke(broken, [])
    assert result.exit_code == 1
    assert "error: java not found" in result.output
    assert "Traceback" not in result.output


def test_unexpected_errors_are_not_swallowed() -> None:
    @click.command()
    @friendly_errors
    def broken() -> None:
        raise ZeroDivisionError("bug")

    result = CliRunner().invoke(broken, [])
    assert result.exit_code == 1
    assert isinstance(result.exception, ZeroDivisionError)


def test_console_script_installed() -> None:
    out = subprocess.run([sys.executable, "-m", "services.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "self-improving spam filter" in out.stdout
