"""bench pretrain / train: figures of the real steps at a tiny size, and the MFU table."""

from __future__ import annotations

import json
import os
import platform
import subprocess

import pytest
import torch

from conftest import REPO, tiny_args, tiny_config
from hybridgan import bench
from hybridgan.bench import PAPER_IMAGES_PER_S, main, peak_flops
from hybridgan.devices import cpu_has_fast_bf16
from hybridgan.models import model_summary
from hybridgan.models.pathak import PathakDiscriminator

BENCH = ["--steps", "2", "--warmup", "1", "--batch-size", "4", "--rate-size", "128"]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on the shared 2-core test machine, 2 OpenMP threads made these steps 5-10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _bench(tmp_path, shards, command: str, *extra: str) -> dict:
    out = tmp_path / f"{command}.json"
    runs = tmp_path / "runs"
    assert main([command, *BENCH, *extra, "--json", str(out), *tiny_args(shards, runs)]) == 0
    assert not runs.exists()  # the run folder is a throwaway one
    return json.loads(out.read_text())


def _check_common(figures: dict) -> None:
    assert figures["device_type"] == "cpu" and "cores" in figures["device"]
    assert (figures["batch_size"], figures["image_size"], figures["steps"]) == (4, 32, 2)
    assert figures["images_per_s"] == pytest.approx(4 / (figures["step_ms"] / 1000), rel=0.02)
    assert figures["images_per_s"] > 0 and figures["peak_host_mib"] > 0
    assert figures["peak_gpu_mib"] is None and figures["mfu"] is None  # no known peak on a CPU
    assert figures["achieved_tflops"] > 0
    assert figures["paper_images_per_s"] == pytest.approx(207.4, abs=0.1)
    assert figures["vs_paper"] == pytest.approx(figures["images_per_s"] / PAPER_IMAGES_PER_S, rel=0.02)
    _check_machine(figures)


def _check_machine(figures: dict) -> None:
    """The machine's rates, measured before and after the timed steps, and the step as a fraction of them."""
    machine = figures["machine"]
    for when in ("before", "after"):
        rates = machine[when]
        assert (rates["threads"], rates["matmul_size"], rates["conv3x3_shape"]) == (1, 128, [1, 256, 32, 32])
        timed = rates["precisions"]
        assert timed == (["fp32", "bf16"] if cpu_has_fast_bf16() else ["fp32"])
        keys = [f"matmul_{p}_gflops" for p in timed] + [
            f"conv3x3_{p}_{layout}_gflops" for p in timed for layout in ("nchw", "channels_last")]
        assert all(0.1 < rates[key] < 100_000 for key in keys), rates  # a CPU thread: GFLOP/s, not FLOP/s or TFLOP/s
        best = rates["best_matmul_precision"]
        assert rates["best_matmul_gflops"] == rates[f"matmul_{best}_gflops"] == max(
            rates[f"matmul_{p}_gflops"] for p in timed)
    assert machine["best_matmul_gflops"] == max(machine["before"]["best_matmul_gflops"],
                                                machine["after"]["best_matmul_gflops"])
    assert figures["achieved_gflops"] == pytest.approx(1000 * figures["achieved_tflops"], abs=0.1)
    assert figures["vs_best_matmul"] == pytest.approx(figures["achieved_gflops"] / machine["best_matmul_gflops"],
                                                      rel=0.01, abs=0.002)
    assert 0 < figures["vs_best_matmul"] < 2


def test_bench_train_splits_the_step_into_g_forward_d_and_g_phases(tiny_shards, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "0")  # recorded: glibc's settings change CPU step times
    figures = _bench(tmp_path, tiny_shards, "train")
    assert figures["malloc_env"]["MALLOC_MMAP_MAX_"] == "0"
    assert figures["keeps_freed_memory"] is (platform.libc_ver()[0] == "glibc")  # set by the CPU train stage
    _check_common(figures)
    assert (figures["stage"], figures["discriminator"], figures["data"]) == ("train", "hybrid", "synthetic")
    assert figures["g_forward_ms"] > 0 and figures["d_phase_ms"] > 0 and figures["g_phase_ms"] > 0
    parts = figures["data_wait_ms"] + figures["g_forward_ms"] + figures["d_phase_ms"] + figures["g_phase_ms"]
    assert parts <= figures["step_ms"]
    assert figures["other_ms"] == pytest.approx(figures["step_ms"] - parts, abs=0.05)
    flops = figures["flops"]
    assert flops["generator_forward"] > 0 and flops["discriminator_forward"] > flops["generator_forward"]
    # G forward once + its backward (3 G); D fwd+bwd on real and fake, then fwd + input backward (8 D)
    assert flops["step_per_image"] == 3 * flops["generator_forward"] + 8 * flops["discriminator_forward"]
    assert flops["formula"] == "3 G + 8 D"
    assert figures["achieved_tflops"] == pytest.approx(
        flops["step_per_image"] * figures["images_per_s"] / 1e12, rel=0.02, abs=1e-4)
    assert set(figures["last_losses"]) >= {"disc_loss", "gen_loss", "gen_pixel_loss", "gen_adv_loss"}
    table = capsys.readouterr().out
    assert "img/s" in table and "paper reference: 207 img/s" in table
    assert "x matmul" in table and f"/ {figures['machine']['best_matmul_gflops']} (the best matmul rate)" in table


def test_bench_pretrain_reads_the_real_loader(tiny_shards, tmp_path):
    figures = _bench(tmp_path, tiny_shards, "pretrain", "--data", "shards")
    _check_common(figures)
    assert (figures["stage"], figures["data"], figures["g_phase_ms"], figures["g_forward_ms"]) == (
        "pretrain", "shards", None, None)
    assert figures["data_wait_ms"] > 0 and figures["d_phase_ms"] > 0
    assert figures["data_wait_ms"] + figures["d_phase_ms"] <= figures["step_ms"]
    assert figures["flops"]["step_per_image"] == 3 * figures["flops"]["discriminator_forward"] > 0
    assert 0 <= figures["last_losses"]["accuracy"] <= 1


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                                        ("NVIDIA GeForce RTX 3090", 71e12), ("AMD EPYC (2 cores)", None)])
def test_peak_flops_by_device_name(name, peak):
    assert peak_flops(name) == peak


def test_bench_rejects_zero_steps(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--steps", "0"])
    assert "--steps" in capsys.readouterr().err


def test_matrix_writes_each_cell_with_mfu_memory_and_data_wait(tiny_shards, tmp_path, monkeypatch, capsys):
    """The GPU script's logic on the CPU: one eager cell measured, a compiled one skipped by --no-compile."""
    monkeypatch.setattr(bench.matrix, "MATRIX", [("no", False, "pathak"), ("bf16", True, "hybrid")])
    out = tmp_path / "matrix.json"
    args = ["matrix", "--cpu", "--no-compile", "--steps", "2", "--warmup", "1", "--batch-size", "4",
            "--rate-size", "128", "--json", str(out), *tiny_args(tiny_shards, tmp_path / "runs")]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["device"] == bench.device_name(torch.device("cpu")) and result["batch_size"] == 4
    measured, skipped = result["cells"]
    assert (measured["precision"], measured["compile"], measured["discriminator"], measured["data"]) == (
        "no", False, "pathak", "shards")
    assert measured["images_per_s"] > 0 and measured["peak_host_mib"] > 0 and "mfu" in measured
    assert measured["data_wait_share"] == pytest.approx(measured["data_wait_ms"] / measured["step_ms"], abs=1e-3)
    assert 0 < measured["data_wait_share"] < 1
    # Pathak's D judges the 16x16 hole of the 32x32 frame: its FLOPs are those of a D built for 16x16
    cfg = tiny_config(tiny_shards, tmp_path / "runs")
    hole_d = model_summary(PathakDiscriminator(cfg.discriminator, 16), torch.zeros(1, 3, 16, 16))
    assert measured["flops"]["discriminator_forward"] == hole_d["flops_per_image"] > 0
    _check_machine(measured)
    assert skipped == {"precision": "bf16", "compile": True, "discriminator": "hybrid", "skipped": "--no-compile"}
    assert "pathak   no    eager:" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_gpu_script_refuses_to_run_without_a_gpu(tmp_path):
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh")], capture_output=True, text=True,
                            env={**os.environ, "SHARDS": str(tmp_path / "none")}, timeout=120)
    assert result.returncode == 2
    assert "error: benchmarks/gpu.sh needs a CUDA GPU" in result.stderr and "--cpu-dry-run" in result.stderr
    assert not (tmp_path / "none").exists()  # nothing packed or written
    assert main(["matrix", "--json", str(tmp_path / "m.json")]) == 2 and not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("name, slug", [("NVIDIA H200", "nvidia-h200"),
                                        ("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3"),
                                        ("AMD EPYC (2 cores)", "amd-epyc-2-cores")])
def test_device_slug_names_the_results_file(name, slug):
    assert bench.device_slug(name) == slug


def test_machine_rates_time_only_the_precisions_the_device_runs_natively(monkeypatch):
    from hybridgan import devices

    monkeypatch.setattr(devices, "cpu_has_fast_bf16", lambda: False)  # an AVX2-only CPU: bf16 is emulated
    timed = []
    monkeypatch.setattr(bench.measure, "_best_seconds", lambda fn, repeats, sync: timed.append(fn()) or 1e-3)
    rates = bench.machine_rates(torch.device("cpu"), 64, repeats=1)
    assert rates["precisions"] == ["fp32"] and rates["best_matmul_precision"] == "fp32"
    assert all(result.dtype == torch.float32 for result in timed) and len(timed) == 3
    assert rates["matmul_bf16_gflops"] is None and rates["conv3x3_bf16_channels_last_gflops"] is None
