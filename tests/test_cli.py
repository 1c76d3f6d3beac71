"""The ``moeflow`` command explains itself: what it does, its version, and for every option of
every command a help text and the default it takes."""

from __future__ import annotations

import argparse
import re

import pytest

from moeflow import __version__
from moeflow.cli import COMMANDS, build_parser, main


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_top_level_help_says_what_the_tool_does(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "expert parallelism on any torch.distributed" in text.replace("\n", " ")
    assert "moeflow demo" in text and "start here:" in text
    for name in COMMANDS:
        assert name in text


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert re.fullmatch(rf"moeflow {re.escape(__version__)} \(torch \S+\)\n", capsys.readouterr().out)


def test_every_option_has_help_and_shows_its_default(capsys):
    subs = _subparsers(build_parser())
    assert set(subs) == set(COMMANDS)
    for name, sub in subs.items():
        assert len(sub.description) > 200, name  # a paragraph for users, not a one-liner
        formatter = sub._get_formatter()
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = action.option_strings[-1] if action.option_strings else action.dest
            assert action.help and len(action.help) > 8, (name, flag)
            shown = formatter._get_help_string(action)
            if action.option_strings and action.default not in (None, False):
                default = " ".join(map(str, action.default)) if isinstance(action.default, list) else action.default
                assert f"(default: {default})" in shown, (name, flag, shown)
            elif action.option_strings and action.default is None and not action.required:
                # leaving it out must mean something the help says, or it names an optional file
                assert "default" in shown or action.metavar == "FILE", (name, flag, shown)
        sub.format_help()  # renders


def test_help_names_no_install_hint_or_file_that_is_not_there():
    text = " ".join(sub.format_help() for sub in _subparsers(build_parser()).values())
    assert "moeflow[" not in text  # install hints work from the repository: pip install -e '.[extra]'
    assert "legacy.md" not in text or "github.com/deepseek-ai/DeepEP" in text


def _imports_after(code: str) -> set[str]:
    """Modules loaded by a fresh interpreter that runs ``code`` (stdout and SystemExit ignored)."""
    import subprocess
    import sys

    probe = ("import contextlib, io, sys\n"
             "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
             + "".join(f"    {line}\n" for line in code.splitlines())
             + "print(' '.join(sorted(sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    return set(out.stdout.split())


def test_help_and_import_load_no_torch():
    # `moeflow --help` and `import moeflow` answer at once: torch (~2 s) and torch._dynamo (~1 s
    # more, through moeflow.layer) load only when a command or a public name needs them
    for code in ("import moeflow", "from moeflow.cli import main\nmain(['--help'])",
                 "from moeflow.cli import main\nmain(['--version'])",
                 "from moeflow.cli import main\nmain(['plan', '--help'])"):
        assert "torch" not in _imports_after(code), code


def test_every_public_name_resolves():
    import moeflow

    loaded = _imports_after("from moeflow import *")
    assert "torch._dynamo" in loaded  # MoELayer's module came in with it
    for name in moeflow.__all__:
        assert getattr(moeflow, name) is not None, name
    assert set(moeflow.__all__) <= set(dir(moeflow))
    with pytest.raises(AttributeError, match="no attribute 'Bufer'"):
        moeflow.Bufer
