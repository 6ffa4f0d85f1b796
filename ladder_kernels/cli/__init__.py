"""The `ladder-kernels` command: finetune, generate, evaluate, plan, bench; one module per subcommand, each with
`register(subparsers)` setting `func(args) -> exit code`.

Input errors (missing file, malformed row, empty dataset, unsupported model, an output folder holding another run)
and a training run that cannot go on (a NaN/Inf loss, out of GPU memory) print one line and exit with 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ladder_kernels import _launch
from ladder_kernels.errors import INPUT_ERRORS

SUBCOMMANDS = ("finetune", "generate", "evaluate", "plan", "bench")
ENV_HELP = """environment:
  The command sets OMP_WAIT_POLICY=PASSIVE before torch is imported when you have not set it: idle OpenMP
  threads then sleep instead of spinning, which keeps a training step several times faster on a CPU shared
  with other work (on an idle one, ~15% slower for the backbone's large matmuls and 1.2-1.8x for the side
  network's many small ops, as in a step from the backbone-state cache; OMP_WAIT_POLICY=ACTIVE restores
  spinning). Your own value is kept. Here:
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ladder-kernels",
        description="Ladder Side Tuning / xLadder fine-tuning on a frozen 4-bit backbone.",
        epilog=ENV_HELP + _launch.describe_env(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:  # imported here, not at the top: `ladder-kernels --help` stays light
        importlib.import_module(f"ladder_kernels.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except INPUT_ERRORS as exc:
        print(f"ladder-kernels {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"\nladder-kernels {args.command}: interrupted (a finetune run continues from its last checkpoint with "
            "--resume)",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
