"""GAN training of the context-encoder generator (paper §2.2.3, Table 2).

    python -m hybridgan.train --config configs/paper.yaml [key=value ...]
    accelerate launch -m hybridgan.train --config configs/paper.yaml discriminator.kind=pathak

Each step masks the batch, lets G fill the hole once (composited into the context), then takes a D
step on L_disc_joint (eq. 4-6), real and fake judged in separate forwards, and a G step on
L_gen_joint (eq. 1-3, beta fixed or found at every step: hybridgan.balance); docs/training-step.md
explains the phases. `discriminator.kind=hybrid` starts D from the pretraining export
(`discriminator.pretrained`, by default the run folder's `pretrain/discriminator.safetensors`);
`pathak` is the paper's baseline; `none` trains G on the pixel loss alone, the baseline that says
whether a discriminator changes anything. The stage folder is `runs/<name>/train-<kind>/`; the
result is `generator.safetensors` there.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.utils import make_grid

from hybridgan.balance import LastLayer, mix_gradients
from hybridgan.config import Config
from hybridgan.data.loader import make_loader, stable_seed, to_device
from hybridgan.data.masks import apply_mask, make_masks
from hybridgan.distributed import mean_over_ranks
from hybridgan.exports import ExportError, export_metadata, load_export, save_export
from hybridgan.losses import (
    adversarial_loss, d_output, discriminator_joint_loss, pixel_loss, trained_pixel_loss,
)
from hybridgan.metrics import HoleMetrics, hole_metrics
from hybridgan.models import build_discriminator, build_generator
from hybridgan.pretrain import EXPORT_NAME as DISCRIMINATOR_EXPORT
from hybridgan.session import TrainingSession, build_adam, run_stage, run_stage_cli, speed_up

EXPORT_NAME = "generator.safetensors"


def stage_name(cfg: Config) -> str:
    """`train-hybrid`, `train-pathak` or `train-none`: the runs of a comparison live in one run folder."""
    return f"train-{cfg.discriminator.kind}"


def pretrained_path(cfg: Config) -> Path:
    """`discriminator.pretrained`, or by default this run folder's pretraining export."""
    if cfg.discriminator.pretrained:
        return Path(cfg.discriminator.pretrained)
    return Path(cfg.run.root) / cfg.run.name / "pretrain" / DISCRIMINATOR_EXPORT


def load_pretrained_discriminator(cfg: Config, disc: torch.nn.Module) -> None:
    """Load the pretraining export into `disc`; ExportError naming the path when that fails, or
    when the held-out accuracy the export records is below `discriminator.min_pretrain_accuracy`
    (a D at chance has learned no blur, and calling it pre-trained would be false)."""
    path = pretrained_path(cfg)
    if not path.is_file():
        raise ExportError(f"{path}: pretraining export not found; run `python -m hybridgan.pretrain` with "
                          f"this config first, or set discriminator.from_scratch=true")
    state, _ = load_export(path, "discriminator")
    recorded = export_metadata(path).get("test_accuracy")
    floor = cfg.discriminator.min_pretrain_accuracy
    if recorded is not None and float(recorded) < floor:
        raise ExportError(f"{path}: its held-out blur accuracy {float(recorded):.3f} is below "
                          f"discriminator.min_pretrain_accuracy={floor} (chance is 0.5): it learned no blur; "
                          f"pretrain longer (docs/quality.md) or set discriminator.min_pretrain_accuracy=0 to use it")
    try:
        disc.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise ExportError(f"{path}: does not fit this discriminator config ({first})") from None


@contextmanager
def judging_only(disc: torch.nn.Module) -> Iterator[None]:
    """D judges without learning: no gradient for its parameters, and its BatchNorm layers normalise
    with the batch's own statistics (train mode, as in the D phase) without updating their running
    statistics or `num_batches_tracked`. Restored on exit."""
    norms = [m for m in disc.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    learning = [p for p in disc.parameters() if p.requires_grad]
    for norm in norms:
        norm.track_running_stats = False
    for param in learning:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for norm in norms:
            norm.track_running_stats = True
        for param in learning:
            param.requires_grad_(True)


def model_names(cfg: Config) -> tuple[str, ...]:
    """The models the stage trains and checkpoints: G alone without a discriminator."""
    return ("gen",) if cfg.discriminator.kind == "none" else ("gen", "disc")


class GanTraining:
    """G, D, their optimisers, and the two phases of a step.

    A step: G fills the holes once (with gradients); the D phase learns real vs `fake.detach()`,
    judging the real and the fake batch in two forwards of the same size (BatchNorm never sees a
    mixed batch); the G phase lets the updated D judge the same fake batch the same way (train mode,
    batch statistics) without changing D, and back-propagates into G's one forward. Without a
    discriminator (`discriminator.kind=none`) the step is the G phase on the pixel loss alone.
    """

    def __init__(self, cfg: Config, session: TrainingSession) -> None:
        self.cfg = cfg
        self.session = session
        gen = build_generator(cfg)
        # watched for beta's gradient norms (hybridgan.balance); the pixel loss alone needs none
        self.last_layer = LastLayer(gen) if cfg.discriminator.kind != "none" else None
        gen = speed_up(gen, cfg.train)
        self.gen, self.opt_g = session.prepare("gen", gen, build_adam(gen, cfg.train))
        self.disc = self.opt_d = None
        if cfg.discriminator.kind != "none":
            disc = build_discriminator(cfg)
            if cfg.discriminator.kind == "hybrid" and not cfg.discriminator.from_scratch:
                load_pretrained_discriminator(cfg, disc)
            disc = speed_up(disc, cfg.train)
            self.disc, self.opt_d = session.prepare("disc", disc, build_adam(disc, cfg.train))
        self._center_mask: torch.Tensor | None = None
        self._mask_rng = torch.Generator(device=session.device)
        self._validated_at = -1

    def masks(self, batch_size: int) -> torch.Tensor:
        """Holes for this step: the fixed centre square, or random ones made on the device by a
        generator re-seeded with (seed, step, rank) (setting a seed is no kernel, no copy, no sync)."""
        cfg, session = self.cfg, self.session
        if cfg.mask.kind == "center":
            if self._center_mask is None or self._center_mask.shape[0] != batch_size:
                self._center_mask = make_masks(cfg.mask, cfg.data.image_size, batch_size).to(session.device)
            return self._center_mask
        self._mask_rng.manual_seed(stable_seed(cfg.run.seed, "mask", session.state.step, session.rank))
        return make_masks(cfg.mask, cfg.data.image_size, batch_size, self._mask_rng)

    def discriminator_step(self, real: torch.Tensor, fake: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Eq. 4-6: D learns real vs the (detached) composited fake, each judged in its own forward."""
        d_real = self.disc(real)
        d_fake = self.disc(fake)
        losses = discriminator_joint_loss(d_real, d_fake, self.cfg.loss, mask)
        self.session.optimize(losses.joint, self.disc, self.opt_d)
        objective = self.cfg.loss.adversarial
        real_score, fake_score = d_real.global_score.detach().float(), d_fake.global_score.detach().float()
        return {"disc_loss": losses.joint.detach(), "d_real": d_output(real_score, objective).mean(),
                "d_fake": d_output(fake_score, objective).mean(),
                "d_margin": real_score.mean() - fake_score.mean()}

    def generator_step(self, real: torch.Tensor, fake: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Eq. 1-3: G learns to fill the hole. D judges through its unwrapped module under
        `judging_only`, so D neither learns nor updates its statistics, and DDP does not synchronise
        D in this phase; the gradient reaches G through `fake`, G's forward of this step, mixed from
        the two terms' gradients with the step's beta (hybridgan.balance)."""
        cfg, session = self.cfg.loss, self.session
        if self.disc is None:
            weighted_pixel = cfg.alpha * trained_pixel_loss(real, fake, cfg, mask)
            session.optimize(weighted_pixel, self.gen, self.opt_g)
            return {"gen_loss": weighted_pixel.detach(), "gen_pixel_loss": pixel_loss(real, fake, mask).detach()}
        acc = session.accelerator
        judged = fake.detach().requires_grad_(True)  # the terms' gradients are taken here, G's graph untouched
        weighted_pixel = cfg.alpha * trained_pixel_loss(real, judged, cfg, mask)
        disc = acc.unwrap_model(self.disc)
        with judging_only(disc), acc.autocast():
            d_fake = disc(judged)
        adv = adversarial_loss(d_fake, cfg, mask)
        masked = apply_mask(real, mask)
        mixed = mix_gradients(judged, weighted_pixel, adv, cfg, session.state.step,
                              lambda grad: self.last_layer.weight_grad(grad, masked, mask))
        session.optimize((fake * mixed.gradient.to(fake.dtype)).sum(), self.gen, self.opt_g)
        return {"gen_loss": mixed.joint, "gen_pixel_loss": pixel_loss(real, judged, mask).detach(),
                "gen_adv_loss": adv.detach(), "beta": mixed.beta, "adv_grad_norm": mixed.adv_grad_norm,
                "pixel_grad_norm": mixed.pixel_grad_norm, "grad_ratio": mixed.grad_ratio}

    def step(self, batch: dict) -> dict[str, torch.Tensor]:
        """One GAN step on `batch`; returns detached device tensors (read back at log steps only)."""
        real = to_device(batch, self.session.device)["image"]
        mask = self.masks(real.shape[0])
        fake = self.gen(apply_mask(real, mask), mask)
        if self.disc is None:
            return self.generator_step(real, fake, mask)
        return {**self.discriminator_step(real, fake.detach(), mask), **self.generator_step(real, fake, mask)}

    @torch.no_grad()
    def validate(self) -> None:
        """PSNR, SSIM, L1, L2 and sharpness inside the hole on the val split; a grid of the first batch.

        Runs every `train.eval_every` steps and at every epoch's end (once when both fall together).
        """
        cfg, session = self.cfg, self.session
        if self._validated_at == session.state.step:
            return
        self._validated_at = session.state.step
        # the unwrapped module: ranks see different numbers of batches, and a DDP forward would
        # wait for the others to sync buffers
        gen = session.accelerator.unwrap_model(self.gen)
        gen.eval()
        tracker = HoleMetrics()
        limit = cfg.train.eval_batches or None
        rng_mask = torch.Generator().manual_seed(cfg.run.seed)
        for index, batch in enumerate(make_loader(cfg, "val", batch_size=cfg.train.batch_size)):
            if limit is not None and index >= limit:
                break
            real = to_device(batch, session.device)["image"]
            mask = make_masks(cfg.mask, cfg.data.image_size, real.shape[0], rng_mask).to(session.device)
            if index % session.world_size != session.rank:
                continue
            with session.accelerator.autocast():
                filled = gen(apply_mask(real, mask), mask).float()
            tracker.add(hole_metrics(filled, real, mask))
            if index == 0 and session.is_main:
                session.logger.image("val/masked_inpainted_original", inpaint_grid(real, mask, filled),
                                     session.state.step)
        gen.train()
        epoch = -(-session.state.step // session.steps_per_epoch)
        values = tracker.per_image()
        means, _ = mean_over_ranks(session.accelerator, {name: value.sum() for name, value in values.items()},
                                   values["psnr"].numel())
        session.logger.scalars("val", session.state.step, epoch, means)

    def export(self) -> Path:
        path = self.session.dir / EXPORT_NAME
        state = self.session.accelerator.get_state_dict(self.gen)
        if self.session.is_main:
            save_export(state, path, self.cfg, "generator")
        return path


def inpaint_grid(real: torch.Tensor, mask: torch.Tensor, filled: torch.Tensor, rows: int = 8) -> torch.Tensor:
    """Columns masked | inpainted | original, one row per face, as a [3, H, W] image in [0, 1]."""
    rows = min(rows, real.shape[0])
    masked = apply_mask(real[:rows], mask[:rows]) + mask[:rows]  # the hole shows white
    tiles = torch.stack([masked.float(), filled[:rows].float(), real[:rows].float()], dim=1).flatten(0, 1)
    return make_grid(((tiles + 1) / 2).clamp(0, 1).cpu(), nrow=3, padding=2)


def train(cfg: Config) -> Path:
    """Run (or resume) GAN training of `cfg`; returns the exported generator's path."""
    session = TrainingSession(cfg, stage_name(cfg), cfg.train, models=model_names(cfg))
    job = GanTraining(cfg, session)
    run_stage(session, job.step, lambda epoch: job.validate(), on_eval=job.validate)
    path = job.export()
    session.finish()
    session.print(f"training done: {path}")
    return path


def main(argv: list[str] | None = None) -> None:
    run_stage_cli(train, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
