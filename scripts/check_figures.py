"""Run the commands behind the figures in README.md and docs/, and check (or record) them.

    python3 scripts/check_figures.py                    # list the figure sets and where they appear
    python3 scripts/check_figures.py --check demo       # re-run, compare with docs/figures.json
    python3 scripts/check_figures.py --record demo      # re-run, store, rewrite the docs' blocks
    python3 scripts/check_figures.py --render           # rewrite the docs' blocks from docs/figures.json

Each figure set is a command (several seeds or repetitions where the figure is noisy) and the
values read from what it prints or writes. ``docs/figures.json`` holds the recorded values (every
seed's), the command, the date and the versions they were measured with (Python, torch,
transformers). The figures appear in the docs between ``<!-- figures:NAME -->`` and
``<!-- /figures:NAME -->``, rendered from that file (mean ± sample standard deviation where a set
has several seeds), with the command and the versions beside them; ``tests/test_figures.py`` checks
that every block equals its rendering, so the docs cannot drift from the record.

``--check`` passes a value when the new mean lies within ``max(2 x recorded spread, floor)`` of the
recorded mean (the floor, per value, covers what seeds alone do not: e.g. 0.02 nats of
validation loss); it prints every value and exits 1 if any fails. Timings come from a shared
machine: their floors are wide, and a failure there says "re-measure", not "broken".
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "docs" / "figures.json"


def versions() -> dict:
    import torch

    try:
        import transformers

        tf = transformers.__version__
    except ImportError:
        tf = None
    return dict(python=platform.python_version(), torch=torch.__version__, transformers=tf)


def _run(args: list[str], timeout: int) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode:
        raise SystemExit(f"check_figures: `{' '.join(args)}` failed:\n{out.stderr[-3000:]}")
    return out.stdout


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _pm(values: list[float], fmt: str) -> str:
    mean, sd = _mean_sd(values)
    return f"{mean:{fmt}} ± {sd:{fmt}}" if len(values) > 1 else f"{mean:{fmt}}"


@dataclass
class FigureSet:
    """A command, the values it yields and how they appear in the docs."""

    name: str
    command: str                                # shown beside the figures
    measure: Callable[[], dict]                 # -> {run: {value: [per seed]}} plus optional "info"
    render: Callable[[dict], str]               # record -> the text between the markers
    floors: dict = field(default_factory=dict)  # value -> smallest tolerance of --check
    where: tuple = ()                           # files holding a block


# ------------------------------------------------------------------------------------- demo
DEMO_SEEDS = (0, 1, 2)
DEMO_RUNS = {"default (expert bias on)": [], "`--no-bias`": ["--no-bias"],
             "`--rebalance-every 50`": ["--rebalance-every", "50"],
             "`--no-bias --rebalance-every 50`": ["--no-bias", "--rebalance-every", "50"]}
DEMO_VALUES = ("final_val_loss", "max_over_mean_expert_last", "max_over_mean_expert_window", "max_over_mean_rank_last")


PARTIAL = Path(tempfile.gettempdir()) / "moeflow_check_figures_partial.json"


def _code_version() -> str:
    """The checkout's commit and a digest of its uncommitted changes (what a cached run ran)."""
    import hashlib

    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout  # noqa: E731
    return git("rev-parse", "HEAD").strip() + ":" + hashlib.sha1(git("diff", "HEAD", "--", "src").encode()).hexdigest()


def _demo_report(flags: list[str], seed: int) -> dict:
    """One demo run's report; kept in PARTIAL (keyed by flags, seed and versions) until the set is
    recorded, so an interrupted --record or --check resumes where it stopped (a run takes minutes)."""
    key = json.dumps([flags, seed, versions(), _code_version()])
    cache = json.loads(PARTIAL.read_text()) if PARTIAL.exists() else {}
    if key not in cache:
        with tempfile.TemporaryDirectory() as tmp:
            _run(["-m", "moeflow.cli", "demo", "--ranks", "4", "--steps", "300", "--seed", str(seed), "--quiet",
                  "--out", tmp, *flags], timeout=7200)
            report = json.loads(Path(tmp, "report.json").read_text())
        report.pop("history")
        cache = json.loads(PARTIAL.read_text()) if PARTIAL.exists() else {}
        cache[key] = report
        PARTIAL.write_text(json.dumps(cache))
    return cache[key]


def measure_demo() -> dict:
    out: dict = {}
    for run, flags in DEMO_RUNS.items():
        out[run] = {}
        for seed in DEMO_SEEDS:
            print(f"  demo {run} seed {seed}", flush=True)
            report = _demo_report(flags, seed)
            values = {k: report[k] for k in DEMO_VALUES}
            values["unigram_val_loss"] = report["unigram_val_loss"]
            if report["rebalance"]:
                rb = report["rebalance"]
                values.update(moves=statistics.fmean(r["moves"] for r in rb),
                              rank_before=statistics.fmean(r["max_over_mean_rank_before"] for r in rb),
                              rank_after=statistics.fmean(r["max_over_mean_rank_after"] for r in rb),
                              rank_planned=statistics.fmean(r["predicted_max_over_mean_rank"] for r in rb))
            for k, v in values.items():
                out[run].setdefault(k, []).append(v)
    return out


def render_demo(rec: dict) -> str:
    runs = rec["values"]
    lines = ["| run | validation loss (nats/byte) | expert max/mean per step | expert max/mean, last 30 steps "
             "summed | rank max/mean per step |", "| --- | --- | --- | --- | --- |"]
    for run, v in runs.items():
        lines.append(f"| {run} | {_pm(v['final_val_loss'], '.2f')} | {_pm(v['max_over_mean_expert_last'], '.2f')} | "
                     f"{_pm(v['max_over_mean_expert_window'], '.2f')} | {_pm(v['max_over_mean_rank_last'], '.2f')} |")
    unigram = next(iter(runs.values()))["unigram_val_loss"]
    lines.append(f"| unigram baseline | {statistics.fmean(unigram):.2f} | | | |")
    lines.append("")
    rebalanced = {run: v for run, v in runs.items() if "moves" in v}
    if rebalanced:
        lines += ["| run | expert moves per rebalance | rank max/mean, 50 steps before | 50 steps after | "
                  "planned from the load average |", "| --- | --- | --- | --- | --- |"]
        for run, v in rebalanced.items():
            lines.append(f"| {run} | {_pm(v['moves'], '.1f')} | {_pm(v['rank_before'], '.2f')} | "
                         f"{_pm(v['rank_after'], '.2f')} | {_pm(v['rank_planned'], '.2f')} |")
        lines.append("")
    seeds = ", ".join(map(str, DEMO_SEEDS))
    lines.append(f"Mean ± standard deviation over seeds {seeds} (`--seed`), 4 ranks, 300 steps: "
                 f"`moeflow demo --ranks 4 --steps 300 --seed S [flags]`. {_measured(rec)} "
                 f"The corpus is this Python's standard library, so the losses move with the Python version.")
    return "\n".join(lines)


# --------------------------------------------------------------------------------- simulate
def measure_simulate() -> dict:
    text = _run(["-m", "moeflow.cli", "simulate"], timeout=600)
    worst = float(re.search(r"largest \|error\|: ([\d.]+)%", text).group(1))
    return {"DeepEP H800": {"largest_error_pct": [worst]}}


def render_simulate(rec: dict) -> str:
    return f"{rec['values']['DeepEP H800']['largest_error_pct'][0]:.1f}%"


# -------------------------------------------------------------------------------- HF loading
HF_LOAD_FAMILIES = ("qwen3_moe", "mixtral", "deepseek_v3", "qwen2_moe", "olmoe", "phimoe")


def measure_hf_load() -> dict:
    return parse_hf_load(_run(["benchmarks/bench_hf_load.py", "--ranks", "4", "--families", *HF_LOAD_FAMILIES],
                              timeout=7200))


def parse_hf_load(text: str) -> dict:
    """bench_hf_load's table -> {family: {value: [one]}}."""
    out = {}
    row = re.compile(r"^(\w+)\s+(\d+)MiB\s+(\d+)%\s+(\d+)MiB\s+(\d+) MiB/rank\s+(\d+) MiB/rank\s+([\d.]+)x\s+([\d.]+)x$")
    for line in text.splitlines():
        m = row.match(line.strip())
        if m:
            out[m.group(1)] = dict(checkpoint_mib=[float(m.group(2))], imports_mib=[float(m.group(4))],
                                   full_mib=[float(m.group(5))], sharded_mib=[float(m.group(6))],
                                   ratio=[float(m.group(7))], ratio_above_imports=[float(m.group(8))])
    if set(out) != set(HF_LOAD_FAMILIES):
        raise SystemExit(f"check_figures: bench_hf_load printed rows for {sorted(out)}:\n{text}")
    return out


def render_hf_load(rec: dict) -> str:
    lines = ["| family | checkpoint | imports | full load | `from_pretrained` | ratio | ratio above the imports |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for family, v in rec["values"].items():
        lines.append(f"| `{family}` | {v['checkpoint_mib'][0]:.0f} MiB | {v['imports_mib'][0]:.0f} MiB | "
                     f"{v['full_mib'][0]:.0f} MiB | {v['sharded_mib'][0]:.0f} MiB | {v['ratio'][0]:.2f}x | "
                     f"{v['ratio_above_imports'][0]:.2f}x |")
    lines += ["", f"`python3 benchmarks/bench_hf_load.py --ranks 4` (peak RSS per rank, the largest rank; "
                  f"every family in the same run against its own full load). {_measured(rec)}"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- experts path
EXPERTS_REPS = 3


def measure_experts() -> dict:
    """Per shape, each candidate's ceiling / candidate ratio in CPU time (1.0 = as fast as one
    dense GEMM chain of the same FLOPs), one value per run."""
    out: dict = {}
    for _ in range(EXPERTS_REPS):
        text = _run(["benchmarks/bench_experts.py"], timeout=3600)
        for line in text.splitlines():
            m = re.match(r"^([\w-]+)\s+\d+\s+\d+\s+\d+\s+\d+-\d+\s+(.*?)\s+\[dense", line)
            if m:
                for name, ratio in re.findall(r"(\w+) ([\d.]+) \([\d.]+\)", m.group(2)):
                    out.setdefault(m.group(1), {}).setdefault(name, []).append(float(ratio))
    return out


def render_experts(rec: dict) -> str:
    v = rec["values"]
    shapes = ", ".join(f"{shape} {_pm(c['module'], '.2f')}" for shape, c in v.items())
    faster = sum(statistics.fmean(c["loop"]) >= statistics.fmean(c["padded_bmm"]) for c in v.values())
    return (f"GroupedExperts (forward + backward, CPU time) ran at this fraction of the dense ceiling: {shapes} "
            f"(1.00 = as fast as one dense GEMM chain; the per-expert path was at least as fast as the padded "
            f"`bmm` at {faster} of {len(v)} shapes); `python benchmarks/bench_experts.py`, {EXPERTS_REPS} runs, "
            f"{_measured(rec)[0].lower()}{_measured(rec)[1:].rstrip('.')}")


def _measured(rec: dict) -> str:
    v = rec["versions"]
    tf = f", transformers {v['transformers']}" if v.get("transformers") else ""
    return f"Measured {rec['date']} with Python {v['python']}, torch {v['torch']}{tf}."


FIGURES = {f.name: f for f in [
    FigureSet("demo", "moeflow demo --ranks 4 --steps 300 --seed S [flags], 4 runs x 3 seeds", measure_demo,
              render_demo, floors=dict(final_val_loss=0.03, unigram_val_loss=0.001, max_over_mean_expert_last=0.03,
                                       max_over_mean_expert_window=0.03, max_over_mean_rank_last=0.02, moves=2.0,
                                       rank_before=0.05, rank_after=0.05, rank_planned=0.02),
              where=("README.md",)),
    FigureSet("simulate", "moeflow simulate", measure_simulate, render_simulate,
              floors=dict(largest_error_pct=0.05), where=("README.md", "docs/scale.md")),
    FigureSet("hf_load", "python3 benchmarks/bench_hf_load.py --ranks 4", measure_hf_load, render_hf_load,
              floors=dict(checkpoint_mib=2, imports_mib=60, full_mib=150, sharded_mib=100, ratio=0.05,
                          ratio_above_imports=0.05), where=("docs/hf.md",)),
    FigureSet("experts", "python benchmarks/bench_experts.py (3 runs)", measure_experts, render_experts,
              floors=dict(module=0.15, loop=0.15, padded_bmm=0.15, grouped_mm=0.15), where=("README.md",)),
]}


# ----------------------------------------------------------------------------------- blocks
def block_pattern(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- figures:{name} -->)(.*?)(<!-- /figures:{name} -->)", re.S)


def blocks_in(text: str, name: str) -> list[str]:
    """The texts between the markers of figure set ``name`` (inline blocks have no newlines)."""
    return [m.group(2).strip("\n") for m in block_pattern(name).finditer(text)]


def rendered(record: dict, name: str) -> str:
    return FIGURES[name].render(record[name])


def write_blocks(record: dict, names) -> None:
    for name in names:
        text = rendered(record, name)
        for rel in FIGURES[name].where:
            path = ROOT / rel
            doc = path.read_text()
            pat = block_pattern(name)
            if not pat.search(doc):
                raise SystemExit(f"check_figures: {rel} has no <!-- figures:{name} --> block")

            def put(m, text=text):
                inline = "\n" not in m.group(2)
                return m.group(1) + (text if inline else f"\n{text}\n") + m.group(3)

            path.write_text(pat.sub(put, doc))
            print(f"wrote the {name} figures into {rel}")


def load_record() -> dict:
    return json.loads(RECORD.read_text()) if RECORD.exists() else {}


def check(name: str, record: dict, new: dict) -> bool:
    fs, old = FIGURES[name], record[name]["values"]
    ok = True
    for run, values in new.items():
        for key, vals in values.items():
            if run not in old or key not in old[run]:
                print(f"  {run:34s} {key:30s} new {statistics.fmean(vals):9.3f}   (not recorded)")
                continue
            mean, sd = _mean_sd(old[run][key])
            new_mean = statistics.fmean(vals)
            tol = max(2 * sd, fs.floors.get(key, 0.0))
            good = abs(new_mean - mean) <= tol
            ok &= good
            print(f"  {run:34s} {key:30s} recorded {mean:9.3f} ± {sd:.3f}  new {new_mean:9.3f}  "
                  f"tolerance {tol:.3f}  {'ok' if good else 'DIFFERS'}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--check", nargs="*", metavar="NAME", help="re-run these figure sets (none named: all) and compare")
    ap.add_argument("--record", nargs="*", metavar="NAME", help="re-run these (none named: all), store, rewrite the docs")
    ap.add_argument("--render", action="store_true", help="rewrite every block from docs/figures.json")
    a = ap.parse_args()
    record = load_record()
    if a.render:
        write_blocks(record, [n for n in FIGURES if n in record])
        return 0
    if a.check is None and a.record is None:
        for name, fs in FIGURES.items():
            when = record.get(name, {}).get("date", "not recorded")
            print(f"{name:10s} {fs.command}  ->  {', '.join(fs.where)}  (recorded: {when})")
        return 0
    names = (a.record if a.record is not None else a.check) or list(FIGURES)
    unknown = sorted(set(names) - set(FIGURES))
    if unknown:
        ap.error(f"unknown figure sets {unknown}; known: {sorted(FIGURES)}")
    ok = True
    for name in names:
        print(f"== {name}: {FIGURES[name].command}", flush=True)
        new = FIGURES[name].measure()
        if a.record is not None:
            record = load_record()  # again: another run may have recorded other sets meanwhile
            record[name] = dict(command=FIGURES[name].command, date=datetime.date.today().isoformat(),
                                versions=versions(), values=new)
            RECORD.write_text(json.dumps(record, indent=1) + "\n")
            write_blocks(record, [name])
            if name == "demo":
                PARTIAL.unlink(missing_ok=True)
        elif name not in record:
            print(f"  not recorded yet: run --record {name}")
            ok = False
        else:
            if record[name]["versions"] != versions():
                print(f"  note: recorded with {record[name]['versions']}, now {versions()}")
            ok &= check(name, record, new)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
