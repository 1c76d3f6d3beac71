"""The ``moeflow`` command: one sub-command per module under ``moeflow.commands``.

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Modules are imported only when their command runs or when
# the parser is built, so `moeflow plan` never pays for what `moeflow demo` imports.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("moeflow.commands.demo", "train a small DeepSeek-style MoE LM expert-parallel on local ranks"),
    "bench": ("moeflow.commands.bench", "time dispatch+combine on local ranks against baselines"),
    "bench-layer": ("moeflow.commands.bench_layer", "time MoE layer forward+backward against no-dedup and DeepSpeed-MoE layers"),
    "bench-ll": ("moeflow.commands.bench_ll", "time low-latency dispatch+combine against raw all-to-alls of its static buffers"),
    "plan": ("moeflow.commands.plan", "plan expert placement (replicas, GPUs, nodes) from per-expert loads"),
    "simulate": ("moeflow.commands.simulate", "model dispatch/combine time on a cluster you don't have"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
