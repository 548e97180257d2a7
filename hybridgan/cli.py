"""The `hybridgan` console script: `hybridgan STAGE [arguments]` runs `python -m hybridgan.STAGE [arguments]`.

    hybridgan train --config paper discriminator.kind=pathak
    hybridgan pack synthetic:2000 --config smoke-cpu
    hybridgan train --help

Each subcommand hands its arguments, untouched, to the `main(argv)` of its module, so both spellings
take the same arguments and print the same errors; `hybridgan STAGE --help` shows them.
"""

from __future__ import annotations

import importlib
import sys

STAGES = {
    "pack": "pack images into WebDataset shards",
    "pretrain": "pre-train the hybrid discriminator on blurred faces",
    "train": "train the generator against a discriminator",
    "evaluate": "compare trained generators on the test split",
    "inpaint": "fill holes in photos with a trained generator",
    "export": "export a model from a checkpoint (--torchscript: a file that runs without hybridgan)",
    "reproduce": "the whole chain: pack, pretrain, train x3, evaluate, report",
    "bench": "throughput benchmarks",
    "sweep": "train over a list of values of one loss key and compare",
}
"""Subcommand -> one line for `hybridgan --help`; each is the module `hybridgan.<subcommand>`."""


def usage() -> str:
    """`hybridgan --help`: the subcommands, one line each, and how to get a subcommand's own help."""
    width = max(map(len, STAGES))
    lines = ["usage: hybridgan STAGE [arguments ...]", "", "stages:"]
    lines += [f"  {name:<{width}}  {what}" for name, what in STAGES.items()]
    lines += ["", "hybridgan STAGE --help shows a stage's arguments, config keys and examples;",
              "python -m hybridgan.STAGE is the same command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the stage named by the first argument with the others; exit code as the stage's."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(usage(), file=sys.stderr)
        return 2
    if args[0] in ("-h", "--help"):
        print(usage())
        return 0
    stage, rest = args[0], args[1:]
    if stage not in STAGES:
        print(f"hybridgan: unknown stage {stage!r} (stages: {', '.join(STAGES)})", file=sys.stderr)
        return 2
    return importlib.import_module(f"hybridgan.{stage}").main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
