"""The ``moeflow`` sub-commands (one module each) and what the benchmark commands share.

Every benchmark takes the same workload arguments (world sizes, tokens per rank, hidden size,
experts, top-k, iterations, an optional JSON file), checks them the same way before spawning
any rank, and reports the slowest rank's median per phase. Those pieces live here; each
command keeps its own defaults and extra options. Kept light: the CLI imports this package
before any command.

A command checks every flag before its first rank starts and raises :class:`UsageError` for
one it cannot run with; ``moeflow`` prints it as one line (``moeflow demo: error: ...``) and
exits with status 2, as argparse does for flags it cannot parse.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from typing import Optional

__all__ = ["UsageError", "check_at_least", "check_writable_dir", "check_writable_file", "add_workload_arguments",
           "check_workload", "slowest_median", "write_json", "rss_bytes", "reset_peak_rss", "speed_words",
           "target_words"]


class UsageError(Exception):
    """A flag's value the command cannot run with; the message names the flag and the value."""


def check_at_least(args: argparse.Namespace, least: int, *names: str) -> None:
    """Each flag ``--name`` (dest ``name``, a number or a list of numbers) is >= ``least``."""
    for name in names:
        value = getattr(args, name)
        if any(v < least for v in (value if isinstance(value, list) else [value])):
            shown = " ".join(map(str, value)) if isinstance(value, list) else value
            raise UsageError(f"--{name.replace('_', '-')} must be >= {least}, got {shown}")


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_writable_dir(path: str, flag: str) -> None:
    """``path`` is a directory this process can write into, or can be made one: a temporary
    file is made and removed in its nearest existing ancestor (permission bits do not tell:
    root passes them on a read-only mount or /sys). Nothing is left behind."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a file, not a directory")
    base = _nearest_existing(path)
    if not os.path.isdir(base):
        raise UsageError(f"{flag} {path} cannot be created: {base} is a file")
    try:
        tempfile.TemporaryFile(dir=base).close()
    except OSError as e:
        raise UsageError(f"{flag} {path} is not writable ({e.strerror} in {base})") from None


def check_writable_file(path: str, flag: str) -> None:
    """``path`` names a file this process can write: its directory exists and the file opens
    for appending (a new one is removed again; an existing one is not changed)."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a directory, not a file")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path}: the directory {parent} does not exist")
    existed = os.path.exists(path)
    try:
        open(path, "a").close()
    except OSError as e:
        raise UsageError(f"{flag} {path} is not writable ({e.strerror})") from None
    if not existed:
        os.remove(path)


def add_workload_arguments(p: argparse.ArgumentParser, *, ranks: list[int], tokens: int, hidden: int,
                           experts: int = 64, topk: int = 8, iters: int, warmup: int,
                           tokens_help: str = "tokens per rank") -> None:
    """Add ``--ranks --tokens --hidden --experts --topk --iters --warmup --json`` with these defaults."""
    p.add_argument("--ranks", type=int, nargs="+", default=ranks, metavar="R",
                   help="world sizes to run, one after the other (local processes)")
    p.add_argument("--tokens", type=int, default=tokens, help=tokens_help)
    p.add_argument("--hidden", type=int, default=hidden, help="hidden size of a token")
    p.add_argument("--experts", type=int, default=experts, help="routed experts in all, divisible by each R")
    p.add_argument("--topk", type=int, default=topk, help="experts per token")
    p.add_argument("--iters", type=int, default=iters, help="timed iterations (the table shows their median)")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed iterations first")
    p.add_argument("--json", metavar="FILE", help="also write the results to FILE as JSON")


def speed_words(ours_s: float, baseline_s: float) -> str:
    """Our time against a baseline's, in words: ``"2.10x faster"`` or ``"1.43x slower"`` (the
    one ratio convention of every benchmark's table)."""
    if ours_s <= baseline_s:
        return f"{baseline_s / ours_s:.2f}x faster"
    return f"{ours_s / baseline_s:.2f}x slower"


def target_words(target: float) -> str:
    """A speed target as context beside a measured ratio, never as pass/fail: ``"(target: 1.5x faster)"``."""
    return f"(target: {target:g}x faster)"


def check_workload(args: argparse.Namespace, *, fp8: bool) -> None:
    """Raise :class:`UsageError` naming the flag when the workload cannot run (before any rank starts).

    Args:
        args: parsed arguments of :func:`add_workload_arguments`.
        fp8: whether some run casts to FP8 (which needs ``--hidden`` divisible by 128).
    """
    check_at_least(args, 1, "ranks", "tokens", "hidden", "experts", "topk", "iters")
    check_at_least(args, 0, "warmup")
    if args.topk > args.experts:
        raise UsageError(f"--topk {args.topk} exceeds --experts {args.experts}")
    if fp8 and args.hidden % 128:
        raise UsageError(f"FP8 needs --hidden divisible by 128, got {args.hidden}")
    for R in args.ranks:
        if args.experts % R:
            raise UsageError(f"--experts {args.experts} not divisible by {R} ranks")
    if args.json:
        check_writable_file(args.json, "--json")


def slowest_median(per_rank: list[dict], key: str, kind: str = "times") -> float:
    """Per iteration the slowest rank decides (``per_rank[r][kind][key]``), then the median."""
    n = len(per_rank[0][kind][key])
    return statistics.median(max(r[kind][key][i] for r in per_rank) for i in range(n))


def write_json(path: Optional[str], rows: list) -> None:
    """Write ``rows`` to ``path`` (``--json``), if given."""
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=2)


def rss_bytes(field: str = "VmRSS") -> int:
    """This process's ``/proc/self/status`` memory field in bytes (``VmRSS`` now, ``VmHWM`` its
    peak); 0 where the file does not exist (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
