"""Every command has help with an example, and the README documents each one."""
from pathlib import Path

import click
from click.testing import CliRunner

from dadpo_offline.cli import main

README = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")


def commands(group=main, prefix=()):
    for name, command in group.commands.items():
        yield prefix + (name,), command
        if isinstance(command, click.Group):
            yield from commands(command, prefix + (name,))


def test_every_command_has_help_and_is_in_the_readme():
    for path, command in commands():
        result = CliRunner().invoke(main, [*path, "--help"])
        assert result.exit_code == 0 and "Usage: " in result.output
        assert command.help and command.help.split("\n")[0].strip()[0].isupper(), path
        assert f"dadpo-offline {' '.join(path)}" in README, f"README does not document: {' '.join(path)}"


def test_leaf_commands_show_an_example():
    for path, command in commands():
        if not isinstance(command, click.Group):
            assert "Example:" in command.help, path


def test_version_flag():
    from dadpo_offline import __version__

    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output
