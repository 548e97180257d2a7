"""Run under `accelerate launch` with 2 processes: a few real steps of both loops, then each rank writes
what it saw and a digest of every parameter, so the test can compare ranks.

    accelerate launch ... tests/ddp_probe.py OUT_DIR --config ... overrides
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from hybridgan.config import load_config
from hybridgan.data.loader import make_loader
from hybridgan.distributed import end_process_group
from hybridgan.pretrain import BlurPretraining
from hybridgan.session import TrainingSession
from hybridgan.train import GanTraining


def digest(module: torch.nn.Module) -> list[float]:
    return [float(p.detach().double().sum()) for p in module.parameters()]


def main() -> None:
    out, config, overrides = Path(sys.argv[1]), sys.argv[3], sys.argv[4:]
    cfg = load_config(config, [*overrides, "discriminator.from_scratch=true"])
    pre_session = TrainingSession(cfg, "pretrain", cfg.pretrain)
    rank, world = pre_session.rank, pre_session.world_size
    pretraining = BlurPretraining(cfg, pre_session)
    gan = GanTraining(cfg, TrainingSession(cfg, "train-hybrid", cfg.train))
    keys: list[str] = []
    before = digest(gan.gen), digest(gan.disc)
    loader = make_loader(cfg, "train", batch_size=8, epoch=0, rank=rank, world_size=world, with_blur=True)  # 4 a rank
    for index, batch in enumerate(loader):
        if index == 2:
            break
        keys.extend(batch["key"])
        pretraining.step(batch)
        gan.step(batch)
    report = {"rank": rank, "world_size": world, "keys": keys, "pretrain_disc": digest(pretraining.disc),
              "gen": digest(gan.gen), "disc": digest(gan.disc), "changed": [before[0] != digest(gan.gen),
                                                                            before[1] != digest(gan.disc)]}
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    end_process_group()


if __name__ == "__main__":
    main()
