"""Pretraining of the hybrid discriminator on blur (paper §2.3, Table 1).

    python -m hybridgan.pretrain --config configs/paper.yaml [key=value ...]
    accelerate launch -m hybridgan.pretrain --config configs/paper.yaml

Each face of a training batch is shown either as it is (target 1) or with a Gaussian-blurred square
(target 0; per-pixel target 0 inside the square, 1 elsewhere), by a seeded coin flip per face. After every epoch the loss and
accuracy on the held-out test split are logged (the paper's Table 1), with what tells a D that
learned blur from one that learned where the square usually is (hybridgan.blur_metrics: accuracy
per blur variance, per-pixel AUROC beside the position prior's, a one-feature classical detector),
and an image grid of original | blurred | per-pixel map. The result is `runs/<name>/pretrain/discriminator.safetensors`,
which GAN training starts from.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate.utils import gather_object
from torch.optim.swa_utils import update_bn
from torchvision.utils import make_grid

from hybridgan.blur_metrics import BlurHeldOut, merge, summary
from hybridgan.config import Config
from hybridgan.data.loader import make_loader, stable_seed, to_device
from hybridgan.distributed import mean_over_ranks
from hybridgan.exports import save_export
from hybridgan.losses import blur_discriminator_loss, decided_real
from hybridgan.models import DiscOutput, build_discriminator
from hybridgan.session import TrainingSession, build_adam, run_stage, run_stage_cli, speed_up
from hybridgan.tracking import read_records

STAGE = "pretrain"
EXPORT_NAME = "discriminator.safetensors"
BATCHNORM_BATCHES = 16
"""Training batches whose statistics replace BatchNorm's running ones before each held-out pass."""


def blur_batch(batch: dict, device: torch.device, coin_rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each face as it is (target 1) or blurred (target 0; per-pixel 0 inside the square), by a coin
    flip drawn on `coin_rng`'s device (the caller seeds it; no host work, no copy).

    A per-image coin, not "every face twice": with a fixed half-and-half batch, BatchNorm lets the
    ResNet compare images within the batch, which works in training mode and collapses to one class
    in evaluation mode (seen here: held-out accuracy stuck at 0.5 while training accuracy rose).
    """
    batch = to_device(batch, device)
    image = batch["image"]
    coin = torch.rand(image.shape[0], generator=coin_rng, device=coin_rng.device) < 0.5
    blurred = coin.view(-1, 1, 1, 1)
    inputs = torch.where(blurred, batch["blurred"], image)
    pixel_target = torch.where(blurred, batch["blur_target"], 1.0)
    return inputs, (~blurred).flatten().float(), pixel_target


def accuracy(out: DiscOutput, global_target: torch.Tensor, objective: str) -> torch.Tensor:
    """Fraction of images whose global score falls on the right side of the objective's midpoint."""
    return (decided_real(out, objective).float() == global_target).float().mean()


class BlurPretraining:
    """The discriminator, its optimiser and the two things done with them: a step and a held-out pass."""

    def __init__(self, cfg: Config, session: TrainingSession) -> None:
        self.cfg = cfg
        self.session = session
        disc = speed_up(build_discriminator(cfg, "hybrid"), cfg.pretrain)
        self.disc, self.optimizer = session.prepare("disc", disc, build_adam(disc, cfg.pretrain))
        self._coin_rng = torch.Generator(device=session.device)
        self.test_accuracy: float | None = None  # the last held-out pass's, recorded in the export

    def coins(self, *parts: object) -> torch.Generator:
        """The device generator for the coins, re-seeded with (seed, *parts) (no kernel, no copy, no sync)."""
        return self._coin_rng.manual_seed(stable_seed(self.cfg.run.seed, *parts))

    def step(self, batch: dict) -> dict[str, torch.Tensor]:
        """One optimisation step on originals vs blurred; returns detached losses."""
        session = self.session
        coin_rng = self.coins("blur-coin", session.state.step, session.rank)
        inputs, global_target, pixel_target = blur_batch(batch, session.device, coin_rng)
        out = self.disc(inputs)
        loss = blur_discriminator_loss(out, global_target, pixel_target, self.cfg.loss)
        session.optimize(loss, self.disc, self.optimizer)
        return {"disc_loss": loss.detach(),
                "accuracy": accuracy(out, global_target, self.cfg.loss.blur_objective).detach()}

    @torch.no_grad()
    def held_out(self, epoch: int) -> None:
        """Loss, accuracy and `blur_metrics.summary` on the test split (every rank takes every
        world_size-th batch; the per-image rows are gathered to every rank)."""
        session, acc, cfg = self.session, self.session.accelerator, self.cfg
        # the unwrapped module: ranks see different numbers of batches, and a DDP forward would
        # wait for the others to sync buffers
        disc = acc.unwrap_model(self.disc)
        self.recalibrate_batchnorm(disc)
        disc.eval()
        loss_sum, images = torch.zeros((), device=session.device), 0
        collected = BlurHeldOut()
        loader = make_loader(cfg, "test", batch_size=cfg.pretrain.batch_size, with_blur=True)
        limit = cfg.pretrain.eval_batches or None
        for index, batch in enumerate(loader):
            if limit is not None and index >= limit:
                break
            if index % session.world_size != session.rank:
                continue
            inputs, global_target, pixel_target = blur_batch(batch, session.device,
                                                             self.coins("blur-coin-test", index))
            with acc.autocast():
                out = disc(inputs)
            loss = blur_discriminator_loss(out, global_target, pixel_target, cfg.loss)
            loss_sum += loss.float() * inputs.shape[0]
            images += inputs.shape[0]
            collected.add(index * cfg.pretrain.batch_size, decided_real(out, cfg.loss.blur_objective),
                          global_target, batch["blur_variance"], inputs, out.pixel_score, pixel_target,
                          1.0 - batch["blur_target"])
            if index == 0 and session.is_main:
                session.logger.image("test/original_blurred_pixelmap", blur_grid(disc, batch), session.state.step)
        test_loss = mean_over_ranks(acc, {"test_loss": loss_sum}, images)[0]["test_loss"]
        disc.train()
        data = merge(gather_object([collected.arrays()]))
        correct = (data["decided_real"] == data["is_real"]).mean()
        values = {"test_loss": test_loss, "test_accuracy": float(correct),
                  **summary(data, cfg.blur.min_variance, cfg.blur.max_variance)}
        session.logger.scalars("test", session.state.step, epoch + 1, values)
        self.test_accuracy = values["test_accuracy"]
        session.print(f"epoch {epoch + 1}: test loss {values['test_loss']:.4f}, test accuracy "
                      f"{values['test_accuracy']:.3f} (classical detector {values['classical_accuracy']:.3f}), "
                      f"pixel AUROC {values['pixel_auroc']:.3f} (position prior {values['prior_auroc']:.3f})")

    @torch.no_grad()
    def recalibrate_batchnorm(self, disc: torch.nn.Module) -> None:
        """Replace BatchNorm's running statistics by the plain mean over the first `BATCHNORM_BATCHES`
        training batches (the same on every rank) as the current weights see them.

        The running averages (momentum 0.1, about the last ten steps) trail weights that change fast
        early in training: measured on real faces after 20 epochs, the held-out global score was the
        same for every face in evaluation mode (AUROC 0.48) and ranked them well with batch statistics
        (0.87), re-estimated 0.86. Training-mode forwards never read the running statistics, so only the
        held-out pass and the export see the change (docs/adversarial.md, "BatchNorm in evaluation")."""
        cfg = self.cfg
        # train=False: the held-out pass's blur (the paper's variances, no curriculum) and no augmentation
        loader = make_loader(cfg, "train", batch_size=cfg.pretrain.batch_size, with_blur=True, train=False)

        def inputs():
            for index, batch in enumerate(loader):
                if index >= BATCHNORM_BATCHES:
                    return
                yield blur_batch(batch, self.session.device, self.coins("blur-coin-batchnorm", index))[0]

        with self.session.accelerator.autocast():
            update_bn(inputs(), disc)

    def export(self) -> Path:
        """Write the discriminator's weights with the run's config and its last held-out accuracy
        (this process's, or the stage's last `test` record when a finished run only re-exports)."""
        path = self.session.dir / EXPORT_NAME
        state = self.session.accelerator.get_state_dict(self.disc)
        if self.session.is_main:
            accuracy = self.test_accuracy
            if accuracy is None:
                tests = [r for r in read_records(self.session.dir / "metrics.jsonl") if r.get("split") == "test"]
                accuracy = tests[-1]["test_accuracy"] if tests else None
            recorded = {} if accuracy is None else {"test_accuracy": f"{accuracy:.6f}"}
            save_export(state, path, self.cfg, "discriminator", recorded)
        return path


def blur_grid(disc: torch.nn.Module, batch: dict, rows: int = 8) -> torch.Tensor:
    """Columns original | blurred | D's per-pixel "real" map of the blurred face, as a [3, H, W] image."""
    device = next(disc.parameters()).device
    originals = batch["image"][:rows].to(device)
    blurred = batch["blurred"][:rows].to(device)
    pixel_map = disc(blurred).pixel_prob.float().repeat(1, 3, 1, 1) * 2 - 1
    tiles = torch.stack([originals.float(), blurred.float(), pixel_map], dim=1).flatten(0, 1)
    return make_grid((tiles.cpu() + 1) / 2, nrow=3, padding=2)


def pretrain(cfg: Config) -> Path:
    """Run (or resume) the pretraining stage of `cfg`; returns the exported discriminator's path."""
    session = TrainingSession(cfg, STAGE, cfg.pretrain)
    job = BlurPretraining(cfg, session)
    run_stage(session, job.step, job.held_out, with_blur=True)
    path = job.export()
    session.finish()
    session.print(f"pretraining done: {path}")
    return path


def main(argv: list[str] | None = None) -> None:
    run_stage_cli(pretrain, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
