"""`hybridgan.pretrain` whose background writer stops for good in the middle of the checkpoint of
step 4, after the first model's weights, so that a test can kill the process during the write.

    python tests/held_writer.py --config ... overrides
"""

from __future__ import annotations

import time

from hybridgan import checkpoint, pretrain

honest_writer = checkpoint.write_snapshot


def held_writer(snapshot: checkpoint.Snapshot, folder) -> None:
    if folder.name.endswith("-00000004"):
        honest_writer(checkpoint.Snapshot(snapshot.models[:1], []), folder)
        time.sleep(600)
    honest_writer(snapshot, folder)


checkpoint.write_snapshot = held_writer
pretrain.main()
