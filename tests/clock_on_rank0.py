"""`hybridgan.pretrain` with a fake clock for `checkpoint_every_minutes`: on rank 0, 20 s pass per
training step; on the other ranks no time passes at all, so only rank 0's clock can say "due".

    accelerate launch ... tests/clock_on_rank0.py --config ... overrides
"""

from __future__ import annotations

import os

import hybridgan.session
from hybridgan import pretrain

SECONDS_PER_STEP = 20.0

now = [0.0]
if os.environ.get("RANK", "0") == "0":
    honest_step = pretrain.BlurPretraining.step

    def step(self, batch):
        now[0] += SECONDS_PER_STEP
        return honest_step(self, batch)

    pretrain.BlurPretraining.step = step
hybridgan.session.clock = lambda: now[0]
pretrain.main()
