"""Resume and checkpoints of a stage: which checkpoint a (re-)run continues from, and when a
checkpoint of the current step is saved and waited for (`hybridgan.checkpoint` writes, verifies
and prunes the files)."""

from __future__ import annotations

from typing import Any

from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list

from hybridgan.checkpoint import CheckpointError, CheckpointManager, any_rank
from hybridgan.config import StageConfig
from hybridgan.core.cadence import Cadence
from hybridgan.core.errors import TrainingError
from hybridgan.core.folder import StageFolder
from hybridgan.core.loss_book import LossBook


class StageCheckpoints:
    """The checkpoints of one stage folder for the session's life: `resume` loads the newest intact
    one, `save` checkpoints the current step once, `wait` waits for the background write in flight,
    `kept` names the newest. Every checkpoint's manifest records `saved_with` (the world size and
    the per-rank batch); `restart_damaged` is `run.restart_damaged`."""

    def __init__(self, accelerator: Accelerator, folder: StageFolder, losses: LossBook, cadence: Cadence,
                 stage_cfg: StageConfig, saved_with: dict[str, int], restart_damaged: bool) -> None:
        self.accelerator = accelerator
        self.folder = folder
        self.losses = losses
        self.cadence = cadence
        self.stage_cfg = stage_cfg
        self.saved_with = saved_with
        self.restart_damaged = restart_damaged
        self.manager = CheckpointManager(accelerator, folder.path, stage_cfg.keep_checkpoints,
                                         background=stage_cfg.checkpoint_async)
        self._saved_step = -1

    def resume(self) -> dict[str, Any] | None:
        """Load the newest intact checkpoint, if any (chosen by the main process: damaged ones are
        moved aside and named); returns the world size and per-rank batch it was written with.

        Onto another world size the run continues exactly: the global batch is the same (the config
        check refuses another), global step g trains on the same images whatever the world size (the
        loader's contract) and the epoch's loss sums are per-step means over ranks. DeepSpeed's ZeRO
        checkpoints partition the optimizer state per rank, so there another world size is refused.
        """
        acc, say, world = self.accelerator, self.accelerator.print, self.accelerator.num_processes
        problem, name = None, None
        if acc.is_main_process:
            try:
                found = self.manager.find_resume_point(say, self.restart_damaged)
                name = found.name if found else None
            except (CheckpointError, OSError) as err:
                problem = str(err)
        if any_rank(acc, problem is not None)[0]:
            raise TrainingError(problem or f"{self.folder.path}: the main process found no usable checkpoint")
        name = broadcast_object_list([name])[0] if world > 1 else name
        if name is None:
            return None
        path = self.manager.dir / name
        saved = self.manager.saved_with(path)
        if saved and saved["world_size"] != world and acc.distributed_type == DistributedType.DEEPSPEED:
            raise TrainingError(f"{path}: written by {saved['world_size']} DeepSpeed ranks, cannot resume on "
                                f"{world} (ZeRO partitions the optimizer state per rank); resume on "
                                f"{saved['world_size']}")
        self.manager.load(path)
        step = self._saved_step = self.losses.state.step
        say(f"resumed {self.folder.path} from {name} (step {step})")
        if saved and saved["world_size"] != world:
            say(f"the checkpoint was written by {saved['world_size']} rank(s) x {saved['batch_size_per_rank']} "
                f"images, resumed on {world} x {self.saved_with['batch_size_per_rank']}: same global batch "
                f"{self.stage_cfg.batch_size}, same data order")
        return saved

    def save(self) -> None:
        """Save a checkpoint of the current step, once (all ranks must call it).

        The folder's config is pinned with the first one (`StageFolder.pin_config`). Accelerate
        saves registered objects from the main process only, so the ranks' running loss sums are
        first folded into the epoch sums every rank holds alike. The minutes until the next
        checkpoint by `checkpoint_every_minutes` count from here. Raises TrainingError naming its
        folder when the background write of the previous checkpoint failed.
        """
        step = self.losses.state.step
        if self._saved_step == step:
            return
        self.folder.pin_config()
        self.losses.fold_epoch_sums()
        try:
            self.manager.save(step, self.saved_with)
        except CheckpointError as err:
            raise TrainingError(str(err)) from None
        self._saved_step = step
        self.cadence.checkpointed()

    def wait(self) -> None:
        """Wait for the checkpoint write in flight; raise TrainingError naming its folder when it
        failed (the previous checkpoint stays the latest)."""
        try:
            self.manager.wait()
        except CheckpointError as err:
            raise TrainingError(str(err)) from None

    def kept(self) -> str:
        """What a stop keeps, in words: the newest checkpoint's folder, or that none was written yet."""
        latest = self.manager.latest()
        return f"the last good checkpoint {latest} is kept" if latest else "no checkpoint was written yet"
