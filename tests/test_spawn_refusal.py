"""spawn refuses, before starting any process, functions its ranks cannot import, and says how to
fix it; a script that calls spawn without the ``__main__`` guard is told about the guard."""

from __future__ import annotations

import functools
import subprocess
import sys
import time

import pytest

from moeflow import spawn

FIX = "define it with `def` at module level in a file"


def _module_level(x):
    return x


def test_refuses_lambdas_and_nested_functions_at_once():
    def nested():
        return 1

    t0 = time.monotonic()
    with pytest.raises(TypeError, match=r"spawn: `fn` \(.*<lambda>\) is a lambda, which the ranks cannot import; "
                                        + FIX):
        spawn(lambda: 1, 2)
    with pytest.raises(TypeError, match=r"test_refuses_lambdas_and_nested_functions_at_once.<locals>.nested\) is "
                                        r"a function defined inside another function"):
        spawn(nested, 2)
    with pytest.raises(TypeError, match="is a lambda"):
        spawn(functools.partial(lambda x: x, 1), 1)
    with pytest.raises(TypeError, match="`fn` must be callable, got int"):
        spawn(3, 1)
    assert time.monotonic() - t0 < 5  # refused before any rank starts (a spawn takes seconds)


def _run_python(args, timeout=240):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)


def test_refuses_a_function_of_python_dash_c():
    code = "import moeflow\ndef f():\n    return 1\nmoeflow.spawn(f, 2)\n"
    out = _run_python(["-c", code])
    assert out.returncode != 0
    assert ("TypeError: spawn: `fn` (f) is defined in the __main__ of `python -c`, a REPL or a notebook, which the "
            "ranks cannot import; " + FIX) in out.stderr, out.stderr


def test_names_the_main_guard_when_a_script_lacks_it(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text("import moeflow\ndef f():\n    return 1\nprint(moeflow.spawn(f, 1, timeout_s=120))\n")
    out = _run_python([str(script)])
    assert out.returncode != 0
    assert "put the call under that guard" in out.stderr, out.stderr[-2000:]


def test_accepts_module_level_functions_and_their_partials():
    # (every other spawn in the suite runs a module-level function; a partial of one passes too)
    from moeflow.launch import _check_importable

    assert _check_importable(_module_level) is None
    assert _check_importable(functools.partial(_module_level, 5)) is None
