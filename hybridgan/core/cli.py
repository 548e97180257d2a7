"""A stage's command line: `--config FILE` and `key=value` overrides, a known failure as one line."""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

from hybridgan.config import Config, add_config_arguments, cli_parser, config_from_args
from hybridgan.core.errors import TrainingError
from hybridgan.distributed import end_process_group

STAGE_EXAMPLES = {
    "hybridgan.pretrain": ["python -m hybridgan.pretrain --config configs/paper.yaml",
                           "python -m hybridgan.pretrain --config configs/smoke-cpu.yaml pretrain.max_steps=20"],
    "hybridgan.train": ["python -m hybridgan.train --config configs/paper.yaml",
                        "python -m hybridgan.train --config configs/paper.yaml discriminator.kind=pathak",
                        "python -m hybridgan.train --config configs/smoke-cpu.yaml train.epochs=1"],
}
"""What the --help of each stage's command line ends with: commands as typed."""


def run_stage_cli(stage: Callable[[Config], Any], description: str, argv: list[str] | None = None) -> None:
    """A stage's command line (`--config FILE` and `key=value` overrides): run it, and print a known
    failure as one line on stderr with exit code 1. Set HYBRIDGAN_DEBUG=1 for the full traceback."""
    spec = sys.modules[stage.__module__].__spec__  # under `python -m`, the module is __main__
    module = spec.name if spec is not None else stage.__module__
    parser = cli_parser(module, description, STAGE_EXAMPLES.get(module, []))
    add_config_arguments(parser)
    cfg = config_from_args(parser.parse_args(argv))
    try:
        stage(cfg)
    except OSError as err:  # e.g. a read-only run folder: name the path, no traceback
        if os.environ.get("HYBRIDGAN_DEBUG"):
            raise
        print(f"error: {f'{err.filename}: {err.strerror}' if err.filename else err}", file=sys.stderr)
        sys.exit(1)
    except (TrainingError, ValueError) as err:
        if os.environ.get("HYBRIDGAN_DEBUG"):
            raise
        # an error raised in a DataLoader worker comes back wrapped with the worker's traceback:
        # its last line is the original one
        lines = str(err).strip().splitlines() or [type(err).__name__]
        print(f"error: {lines[-1]}", file=sys.stderr)
        sys.exit(1)
    end_process_group()
