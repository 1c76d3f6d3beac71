"""Every figure block in README.md and docs/ shows what docs/figures.json recorded, rendered by
scripts/check_figures.py (which re-runs the commands behind them: ``--check``), with the command
and the versions it was measured with."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _check_figures():
    spec = importlib.util.spec_from_file_location("check_figures", ROOT / "scripts" / "check_figures.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["check_figures"] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_docs_show_the_recorded_figures():
    cf = _check_figures()
    record = cf.load_record()
    for name, fs in cf.FIGURES.items():
        assert name in record, f"figure set {name} is not recorded: python3 scripts/check_figures.py --record {name}"
        rec = record[name]
        assert rec["command"] == fs.command and rec["date"]
        assert rec["versions"]["python"] and rec["versions"]["torch"], name
        text = cf.rendered(record, name)
        assert text
        for rel in fs.where:
            blocks = cf.blocks_in((ROOT / rel).read_text(), name)
            assert blocks, f"{rel} has no <!-- figures:{name} --> block"
            for block in blocks:
                assert block == text, f"{rel}'s {name} figures differ from docs/figures.json: --render rewrites them"
    # no block of an unknown set anywhere
    import re

    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for name in re.findall(r"<!-- figures:(\w+) -->", path.read_text()):
            assert name in cf.FIGURES, (path.name, name)


def test_check_compares_within_the_recorded_spread(capsys):
    cf = _check_figures()
    record = {"demo": {"values": {"default": {"final_val_loss": [2.50, 2.52, 2.54], "moves": [10.0]}}}}
    assert cf.check("demo", record, {"default": {"final_val_loss": [2.55], "moves": [11.5]}})  # within 2 sd / floor
    assert not cf.check("demo", record, {"default": {"final_val_loss": [2.60]}})              # 0.08 > max(0.04, 0.03)
    out = capsys.readouterr().out
    assert "DIFFERS" in out and "ok" in out
