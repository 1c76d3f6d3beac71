"""The ``moeflow`` command: one sub-command per module under ``moeflow.commands``.

Each command module exposes ``add_arguments(parser)``, ``run(args) -> int`` and ``DESCRIPTION``,
what ``moeflow COMMAND --help`` says the command does (for users, not for the code's readers).
"""

from __future__ import annotations

import argparse
import importlib
import sys

DESCRIPTION = """\
moeflow gives PyTorch Mixture-of-Experts models expert parallelism on any torch.distributed
backend (NCCL on GPUs, Gloo on CPUs): tokens travel to the ranks that hold their experts and
back, with load balancing and expert placement. The commands below train and time it on this
machine (local processes as ranks, on the CPU), plan expert placement from measured loads, and
model clusters you do not have; none needs a GPU."""

EPILOG = """\
start here:
  moeflow demo                       train a small MoE language model on 4 local ranks (minutes)
  moeflow bench                      time dispatch+combine against plain all-to-alls
  moeflow simulate --nodes 4         model dispatch/combine on a 4-node GPU cluster
  moeflow COMMAND --help             every option of a command, with its default"""

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


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions' line breaks and appends each option's default to its help, except
    where the default is None or False (the help then says what leaving it out means)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default is argparse.SUPPRESS or "(default" in text
                or not action.option_strings):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {shown})"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    try:  # from the installed metadata: importing torch for its version would take seconds
        return f"moeflow {__version__} (torch {version('torch')})"
    except PackageNotFoundError:  # pragma: no cover - torch is a dependency
        return f"moeflow {__version__}"


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; with ``only`` (a command name) the options of that command alone, so
    that ``moeflow --help`` or ``moeflow plan`` imports no other command's module (and no torch)."""
    parser = argparse.ArgumentParser(prog="moeflow", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=help_text)
            continue
        mod = importlib.import_module(module)
        description = getattr(mod, "DESCRIPTION", help_text)
        p = sub.add_parser(name, help=help_text, description=description, formatter_class=HelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .commands import UsageError

    argv = sys.argv[1:] if argv is None else argv
    # the command is the first word that is not an option (the top level has only --help, --version)
    command = next((a for a in argv if not a.startswith("-")), "")
    args = build_parser(only=command).parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except UsageError as e:  # a flag checked before any rank started: one line, as argparse's errors
        print(f"moeflow {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
