"""GAN training: learning, both discriminators, phase isolation, resume, 2 ranks, TensorBoard."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import REPO, SMOKE, tiny_args, tiny_config
from hybridgan.config import ConfigError
from hybridgan.data.loader import make_loader, stable_seed, to_device
from hybridgan.data.masks import apply_mask, make_masks
from hybridgan.exports import ExportError
from hybridgan.metrics import HoleMetrics, mean_fill
from hybridgan.pretrain import EXPORT_NAME as DISC_EXPORT, BlurPretraining, pretrain
from hybridgan.session import TrainingError, TrainingSession
from hybridgan.models import build_discriminator, build_generator, model_summary
from hybridgan.models.layers import WholeInputConv2d, WholeOutputConvTranspose2d
from hybridgan.train import EXPORT_NAME, GanTraining, judging_only, train
from stage_runs import (accelerate_2_ranks, assert_same_weights, failure, kill_after_checkpoint, latest_step,
                        launches, read_records, run_stage, stage_env)

TABLE2 = ("gen_adv_loss", "gen_pixel_loss", "disc_loss")
EPOCHS = 4
LEARN = [f"train.epochs={EPOCHS}", "train.eval_every=8", "train.eval_batches=0", "train.checkpoint_every=100", "train.lr=0.002"]


@pytest.fixture(scope="module")
def pretrained(tiny_shards, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    return pretrain(tiny_config(tiny_shards, runs, "pretrain.max_steps=4"))


@pytest.fixture(scope="module")
def hybrid_run(tiny_shards, pretrained):
    cfg = tiny_config(tiny_shards, pretrained.parents[2], *LEARN, f"discriminator.pretrained={pretrained}")
    return cfg, train(cfg).parent


def test_pixel_loss_falls_and_the_fill_beats_the_mean_colour(hybrid_run):
    cfg, stage = hybrid_run
    epochs = read_records(stage, "epoch")
    assert len(epochs) == EPOCHS and set(TABLE2) <= set(epochs[0])
    assert epochs[-1]["gen_pixel_loss"] < 0.6 * epochs[0]["gen_pixel_loss"]
    val = read_records(stage, "val")[-1]
    baseline = HoleMetrics()
    for batch in make_loader(cfg, "val", batch_size=8):
        batch = to_device(batch, "cpu")
        mask = make_masks(cfg.mask, cfg.data.image_size, batch["image"].shape[0])
        baseline.update(mean_fill(apply_mask(batch["image"], mask), mask), batch["image"], mask)
    assert val["psnr"] > baseline.compute()["psnr"] + 0.5
    assert 0 < val["ssim"] <= 1 and val["sharpness"] > 0


def test_tensorboard_holds_table2_validation_metrics_and_grids(hybrid_run):
    _, stage = hybrid_run
    events = EventAccumulator(str(stage / "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {f"epoch/{name}" for name in TABLE2} <= scalars
    assert {"val/psnr", "val/ssim", "val/l1", "val/sharpness", "train/d_real", "train/d_fake"} <= scalars
    logged = [e.value for e in events.Scalars("epoch/gen_pixel_loss")]
    assert logged == pytest.approx([r["gen_pixel_loss"] for r in read_records(stage, "epoch")], rel=1e-6)
    grid = events.Images("val/masked_inpainted_original")[-1]
    assert grid.width == 3 * 32 + 4 * 2


def test_pathak_baseline_trains_without_any_pretraining_export(tiny_shards, tmp_path):
    cfg = tiny_config(tiny_shards, tmp_path, "discriminator.kind=pathak", "discriminator.pretrained=''",
                      "train.max_steps=4")
    export = train(cfg)
    assert export.parent.name == "train-pathak"
    records = read_records(export.parent, "train")
    assert records and all(math.isfinite(r["disc_loss"]) for r in records)


def test_missing_pretraining_export_is_one_clear_error(tiny_shards, tmp_path):
    missing = tmp_path / "nowhere" / DISC_EXPORT
    result = run_stage("hybridgan.train", tiny_args(tiny_shards, tmp_path, f"discriminator.pretrained={missing}"))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {missing}: pretraining export not found; run `python -m hybridgan.pretrain` with this "
        f"config first, or set discriminator.from_scratch=true")
    default = tmp_path / "empty" / "pretrain" / DISC_EXPORT
    with pytest.raises(ExportError, match=f"^{default}: pretraining export not found"):
        train(tiny_config(tiny_shards, tmp_path, "run.name=empty", "discriminator.pretrained=''"))


def state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (BatchNorm running statistics, num_batches_tracked), copied."""
    return {name: t.detach().clone() for name, t in [*module.named_parameters(), *module.named_buffers()]}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.parametrize("kind", ["hybrid", "pathak"])
def test_the_real_step_runs_g_once_judges_pure_batches_and_each_phase_changes_only_its_network(
        tiny_shards, tmp_path, monkeypatch, kind):
    cfg = tiny_config(tiny_shards, tmp_path, f"discriminator.kind={kind}", "discriminator.from_scratch=true")
    job = GanTraining(cfg, TrainingSession(cfg, f"train-{kind}", cfg.train))
    gen, disc = (job.session.accelerator.unwrap_model(model) for model in (job.gen, job.disc))
    fakes, judged, norm_batches, phases = [], [], [], []
    gen.register_forward_hook(lambda module, args, out: fakes.append(out.detach().clone()))
    disc.register_forward_pre_hook(lambda module, args: judged.append((module.training, args[0].detach().clone())))
    for norm in (m for m in disc.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        norm.register_forward_pre_hook(lambda module, args: norm_batches.append(args[0].shape[0]))

    def watch(method: str) -> None:
        honest = getattr(GanTraining, method)

        def watched(self, *args):
            before = state_of(gen), state_of(disc)
            losses = honest(self, *args)
            phases.append((method, before, (state_of(gen), state_of(disc))))
            return losses
        monkeypatch.setattr(GanTraining, method, watched)

    watch("discriminator_step")
    watch("generator_step")
    batch = next(iter(make_loader(cfg, "train", batch_size=8)))
    mask = job.masks(8)
    for step in range(2):  # the second step starts from running statistics the first one moved
        job.step(batch)
        assert len(fakes) == step + 1, "G's forward ran more than once in a step"
        fake, known = fakes[-1], 1 - mask
        inputs = judged[3 * step:3 * step + 3]
        assert len(judged) == 3 * (step + 1) and all(training for training, _ in inputs)
        real_in, fake_in, fake_in_g_phase = (x for _, x in inputs)
        assert all(x.shape == fake.shape for x in (real_in, fake_in, fake_in_g_phase))
        # the real batch: the same faces (equal to the fakes outside the hole), none of them a fake
        assert torch.equal(real_in * known, fake * known)
        assert not any(torch.equal(real_in[i], fake[i]) for i in range(8))
        assert torch.equal(fake_in, fake) and torch.equal(fake_in_g_phase, fake)
    assert set(norm_batches) == {8}, "a D BatchNorm saw a batch of another size (a mixed real+fake batch)"
    assert [name for name, _, _ in phases] == ["discriminator_step", "generator_step"] * 2
    for name, (gen_before, disc_before), (gen_after, disc_after) in phases:
        own, other = ((disc_before, disc_after), (gen_before, gen_after)) if name == "discriminator_step" \
            else ((gen_before, gen_after), (disc_before, disc_after))
        assert same_state(*other), f"{name} changed the other network's parameters or buffers"
        assert not same_state(*own), f"{name} did not change its own network"
    assert all(p.requires_grad for p in disc.parameters())
    assert all(m.track_running_stats for m in disc.modules() if isinstance(m, torch.nn.BatchNorm2d))


# Host-device synchronisations: reading a value (item, bool, float, int, tolist, numpy), copying to the
# host (cpu), and ops whose output size depends on the data.
SYNCING_METHODS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")
SYNCING_OPS = {torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero, torch.ops.aten.masked_select,
               torch.ops.aten._unique2, torch.ops.aten.unique_consecutive, torch.ops.aten.is_nonzero}


class SyncRecorder(TorchDispatchMode):
    """Records the syncing ops the dispatcher sees (C++ callers included) while `active`."""

    def __init__(self, is_host_counter) -> None:
        super().__init__()
        self.events: list[str] = []
        self.is_host_counter = is_host_counter

    def record(self, what: str, tensor) -> None:
        if isinstance(tensor, torch.Tensor) and self.is_host_counter(tensor):
            return
        self.events.append(what)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in SYNCING_OPS:
            self.record(str(func), args[0] if args else None)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("stage", ["train", "pretrain"])
def test_no_host_device_sync_on_the_steps_of_the_real_loop_that_do_not_log(tiny_shards, tmp_path, monkeypatch, stage):
    cfg = tiny_config(tiny_shards, tmp_path, f"{stage}.epochs=2", f"{stage}.max_steps=10", f"{stage}.log_every=5",
                      f"{stage}.checkpoint_every=100", "discriminator.from_scratch=true", "mask.kind=random_box",
                      "mask.min_box=8", "mask.max_box=16")
    job_class, run_stage_of = (GanTraining, train) if stage == "train" else (BlurPretraining, pretrain)
    optimizers: list[torch.optim.Optimizer] = []

    def is_adam_step_counter(tensor: torch.Tensor) -> bool:
        """Adam (neither fused nor capturable) keeps its step counts on the host: reading them is no sync."""
        return any(tensor is state.get("step") for opt in optimizers
                   for state in getattr(opt, "optimizer", opt).state.values())

    recorder = SyncRecorder(is_adam_step_counter)
    per_step: dict[int, list[str]] = {}
    active = []

    def counted(name: str):
        honest = getattr(torch.Tensor, name)

        def method(self, *args, **kwargs):
            if active:
                recorder.record(f"Tensor.{name}", self)
            return honest(self, *args, **kwargs)
        return method

    for name in SYNCING_METHODS:
        monkeypatch.setattr(torch.Tensor, name, counted(name))

    def watched(cls, method: str):
        honest = getattr(cls, method)

        def run(self, *args):
            if isinstance(self, job_class) and not optimizers:
                optimizers.extend(v for v in vars(self).values() if isinstance(v, torch.optim.Optimizer))
            session = self.session if isinstance(self, job_class) else self
            step = session.state.step + 1  # end_step counts the step on entry
            active.append(True)
            try:
                with recorder:
                    return honest(self, *args)
            finally:
                active.pop()
                per_step.setdefault(step, []).extend(recorder.events)
                recorder.events.clear()
        monkeypatch.setattr(cls, method, run)

    watched(job_class, "step")
    watched(TrainingSession, "end_step")
    run_stage_of(cfg)
    assert optimizers and sorted(per_step) == list(range(1, 11))
    log_steps = {5, 8, 10}  # log_every, the end of epoch 1 (8 batches of 8), the last step
    assert {step: events for step, events in per_step.items() if step not in log_steps and events} == {}
    assert all(per_step[step] for step in log_steps), "the counter saw no read-back at a log step"


def test_random_masks_are_drawn_on_the_device_generator_seeded_by_seed_step_and_rank(tiny_shards, tmp_path):
    cfg = tiny_config(tiny_shards, tmp_path, "discriminator.kind=pathak", "discriminator.pathak_input=frame",
                      "mask.kind=strokes")
    job = GanTraining(cfg, TrainingSession(cfg, "train-pathak", cfg.train))
    first = job.masks(8)
    assert torch.equal(job.masks(8), first)
    expected = make_masks(cfg.mask, 32, 8, torch.Generator().manual_seed(stable_seed(0, "mask", 0, 0)))
    assert torch.equal(first, expected) and first.device == job.session.device
    job.session.state.step = 1
    assert not torch.equal(job.masks(8), first)


@pytest.mark.parametrize("kind,pathak_input", [("hybrid", "hole"), ("pathak", "hole"), ("pathak", "frame")])
def test_both_phases_trace_into_one_graph_per_forward(tiny_shards, tmp_path, kind, pathak_input):
    cfg = tiny_config(tiny_shards, tmp_path, f"discriminator.kind={kind}", f"discriminator.pathak_input={pathak_input}")
    gen, disc = build_generator(cfg), build_discriminator(cfg)
    real = torch.rand(4, 3, 32, 32) * 2 - 1
    mask = make_masks(cfg.mask, 32, 4)
    fake = gen(apply_mask(real, mask), mask).detach()
    torch._dynamo.reset()
    reports = {"G": torch._dynamo.explain(gen)(apply_mask(real, mask), mask),
               "D (D phase, real and fake alike)": torch._dynamo.explain(disc)(real)}
    with judging_only(disc):
        reports["D judging only (G phase)"] = torch._dynamo.explain(disc)(fake)
    for name, report in reports.items():
        assert report.graph_count == 1 and report.graph_break_count == 0, f"{name}: {report.break_reasons}"


def test_pathak_d_judges_the_hole_by_default_and_the_frame_as_the_named_departure(tiny_shards, tmp_path):
    hole_cfg = tiny_config(tiny_shards, tmp_path, "discriminator.kind=pathak")
    frame_cfg = tiny_config(tiny_shards, tmp_path, "discriminator.kind=pathak", "discriminator.pathak_input=frame")
    torch.manual_seed(0)
    hole_d, frame_d = build_discriminator(hole_cfg).eval(), build_discriminator(frame_cfg).eval()
    image = torch.rand(2, 3, 32, 32) * 2 - 1
    outside = image.clone()
    outside[:, :, :4] = -1  # rows above the 16x16 centre hole (8..24)
    inside = image.clone()
    inside[:, :, 12:20, 12:20] = -1
    with torch.no_grad():
        assert torch.equal(hole_d(outside).global_prob, hole_d(image).global_prob)
        assert not torch.equal(hole_d(inside).global_prob, hole_d(image).global_prob)
        assert not torch.equal(frame_d(outside).global_prob, frame_d(image).global_prob)
    flops = {name: model_summary(d, image)["flops_per_image"] for name, d in (("hole", hole_d), ("frame", frame_d))}
    assert flops["frame"] > 3.5 * flops["hole"]
    with pytest.raises(ConfigError, match=r"overrides: discriminator.pathak_input='hole' judges the centre hole, "
                                          r"which mask.kind='strokes' does not have; set "
                                          r"discriminator.pathak_input=frame or mask.kind=center$"):
        tiny_config(tiny_shards, tmp_path, "discriminator.kind=pathak", "mask.kind=strokes")


def test_the_bottleneck_as_a_matrix_product_equals_the_convolutions():
    torch.manual_seed(0)
    down, up = WholeInputConv2d(8, 6, 4), WholeOutputConvTranspose2d(6, 5, 4)
    x, z = torch.randn(3, 8, 4, 4), torch.randn(3, 6, 1, 1)
    torch.testing.assert_close(down(x), torch.nn.functional.conv2d(x, down.weight))
    torch.testing.assert_close(up(z), torch.nn.functional.conv_transpose2d(z, up.weight))
    assert list(down.state_dict()) == ["weight"] and down.weight.shape == (6, 8, 4, 4)
    assert up.weight.shape == (6, 5, 4, 4)


def test_sigkill_then_rerun_finishes_with_the_uninterrupted_generator(tiny_shards, tmp_path):
    base = ["train.epochs=2", "train.checkpoint_every=3", "discriminator.from_scratch=true", "train.eval_every=4"]
    whole = run_stage("hybridgan.train", tiny_args(tiny_shards, tmp_path, "run.name=whole", *base))
    assert whole.returncode == 0, whole.stderr
    args = tiny_args(tiny_shards, tmp_path, "run.name=killed", *base)
    stage = tmp_path / "killed" / "train-hybrid"
    kill_after_checkpoint("hybridgan.train", args, stage, min_step=3)
    interrupted_at = latest_step(stage)
    resumed = run_stage("hybridgan.train", args)
    assert resumed.returncode == 0, resumed.stderr
    assert [r["start_step"] for r in launches(stage)] == [0, interrupted_at]
    reference = tmp_path / "whole" / "train-hybrid"
    assert_same_weights(reference / EXPORT_NAME, stage / EXPORT_NAME)
    assert [r["step"] for r in read_records(stage, "epoch")] == [8, 16]
    assert read_records(stage, "epoch") == read_records(reference, "epoch")


def test_two_real_processes_sync_both_models_on_disjoint_samples(tiny_shards, tmp_path):
    overrides = tiny_args(tiny_shards, tmp_path)[2:]
    probe = [*accelerate_2_ranks(), str(REPO / "tests" / "ddp_probe.py"), str(tmp_path), "--config", str(SMOKE),
             *overrides]
    result = subprocess.run(probe, cwd=REPO, env=stage_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, failure(result)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert not set(ranks[0]["keys"]) & set(ranks[1]["keys"]) and len(ranks[0]["keys"]) == 8
    for name in ("pretrain_disc", "gen", "disc"):
        assert ranks[0][name] == ranks[1][name], f"{name} differs across ranks"
    assert ranks[0]["changed"] == [True, True]


def test_two_process_training_writes_from_rank0_only(tiny_shards, tmp_path):
    args = tiny_args(tiny_shards, tmp_path, "train.max_steps=4", "discriminator.from_scratch=true")
    result = run_stage("hybridgan.train", args, launcher=accelerate_2_ranks())
    assert result.returncode == 0, failure(result)
    stage = tmp_path / "t" / "train-hybrid"
    assert launches(stage)[0]["world_size"] == 2
    assert len(list((stage / "tb").glob("events.out.tfevents.*"))) == 1
    assert result.stdout.count("training done") == 1
    assert (stage / EXPORT_NAME).is_file()


def test_a_nan_loss_stops_naming_step_and_loss_and_keeps_the_last_good_checkpoint(tiny_shards, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_shards, tmp_path, "discriminator.kind=pathak", "train.checkpoint_every=3", "train.epochs=2")
    honest_step = GanTraining.generator_step

    def poisoned_step(self, real, fake, mask):
        losses = honest_step(self, real, fake, mask)
        if self.session.state.step == 4:  # the 5th step, counted from 0 before it ends
            losses["gen_pixel_loss"] = torch.tensor(float("nan"))
        return losses

    monkeypatch.setattr(GanTraining, "generator_step", poisoned_step)
    with pytest.raises(TrainingError) as err:
        train(cfg)
    stage = tmp_path / "t" / "train-pathak"
    assert str(err.value) == (f"step 5: gen_pixel_loss is nan; stopped, the last good checkpoint "
                              f"{stage / 'checkpoints' / 'step-00000003'} is kept")
    assert latest_step(stage) == 3
    assert all(math.isfinite(r["gen_pixel_loss"]) for r in read_records(stage, "train"))


def test_no_discriminator_is_a_first_class_run_on_the_pixel_loss_alone(tiny_shards, tmp_path):
    cfg = tiny_config(tiny_shards, tmp_path, "discriminator.kind=none", "train.max_steps=4")
    export = train(cfg)
    stage = export.parent
    assert stage.name == "train-none"
    records = read_records(stage, "train")
    assert records and set(records[-1]) >= {"gen_loss", "gen_pixel_loss"}
    assert not {"disc_loss", "gen_adv_loss", "d_real", "beta"} & set(records[-1])
    state = sorted(p.name for p in (stage / "checkpoints" / "step-00000004").iterdir())
    assert "model.safetensors" in state and "model_1.safetensors" not in state  # G alone is checkpointed


def test_the_g_step_logs_beta_the_gradient_norms_and_ds_margin(tiny_shards, tmp_path):
    cfg = tiny_config(tiny_shards, tmp_path, "discriminator.kind=pathak", "train.max_steps=4", "train.log_every=1",
                      "loss.adversarial=lsgan", "loss.beta_mode=adaptive", "loss.adaptive_scale=0.2",
                      "loss.adversarial_warmup=2")
    stage = train(cfg).parent
    records = read_records(stage, "train")
    assert [r["beta"] == 0.0 for r in records] == [True, False, False, False]  # ramped from 0 over 2 steps
    later = records[-1]
    assert later["grad_ratio"] == pytest.approx(0.2, rel=1e-3)  # adaptive: the ratio at G's last layer
    assert later["adv_grad_norm"] > 0 and later["pixel_grad_norm"] > 0
    assert later["d_margin"] == pytest.approx(later["d_real"] - later["d_fake"], abs=1e-5)  # lsgan: raw scores
    events = EventAccumulator(str(stage / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    assert {"train/beta", "train/grad_ratio", "train/adv_grad_norm", "train/d_margin"} <= set(events.Tags()["scalars"])


def test_a_pretrained_d_at_chance_is_refused_naming_the_key(tiny_shards, tmp_path, pretrained):
    cfg = tiny_config(tiny_shards, tmp_path, f"discriminator.pretrained={pretrained}",
                      "discriminator.min_pretrain_accuracy=0.99")
    with pytest.raises(ExportError, match=r"held-out blur accuracy 0\.\d+ is below "
                                          r"discriminator.min_pretrain_accuracy=0.99 \(chance is 0.5\)"):
        train(cfg)
    assert not (tmp_path / "t" / "train-hybrid" / "config.yaml").exists()
