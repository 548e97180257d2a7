"""Our Pathak baseline step against the public Pathak context-encoder code, in alternating rounds.

    git clone https://github.com/BoyuanJiang/context_encoder_pytorch /tmp/peer
    OMP_NUM_THREADS=1 python benchmarks/pathak_peer.py --peer /tmp/peer [--rounds 3 --steps 3]

The peer is Pathak's network pair (`_netG`, `_netlocalD` from the checkout's model.py) trained by the
body of the inner loop of the checkout's train.py, run as it is written there with the fixes current
PyTorch needs: `transforms.Scale` -> `Resize` (not used here: batches come from memory),
`imageSize/2` -> `imageSize//2`, `.data[0]` -> `.item()` (in the print, which is left out), D's
`view(-1, 1)` -> `view(-1)`, and `--overlapPred 0` (a true 64x64 hole). Ours is one
`GanTraining.step` of `configs/paper.yaml` with `discriminator.kind=pathak` in fp32, fed uint8 batches as our loader
yields them (the step normalises them on the device with `to_device`); the peer gets the same faces
as float in [-1, 1], as its DataLoader yields them. Both: batch 16, 128x128, 64x64 centre hole, the
same thread count. Each side runs in a process of its own (started fresh, not forked): our
training sets glibc's allocator to keep freed memory (`hybridgan.host_memory`), a process-wide
setting that the peer's code, run as its users run it, does not have. Each round times
`--steps` steps of one and then of the other (after one untimed warm-up step each), so both see the
same load on a shared machine; the script prints the median img/s of each over the rounds, their
ratio, and the FLOPs of one training step per image (forward and backward, counted by PyTorch's
FlopCounterMode) as one JSON line at the end.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import statistics
import sys
import tempfile
import textwrap
import time
from multiprocessing.connection import Connection
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Callable

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hybridgan.config import load_config  # noqa: E402
from hybridgan.data.loader import to_device  # noqa: E402
from hybridgan.data.synthetic import synthetic_face  # noqa: E402
from hybridgan.session import TrainingSession  # noqa: E402
from hybridgan.train import GanTraining  # noqa: E402

BATCH, SIZE = 16, 128


def synthetic_batches(count: int) -> list[torch.Tensor]:
    """`count` batches of synthetic faces, uint8 [16, 3, 128, 128], as our loader yields them."""
    faces = np.stack([np.asarray(synthetic_face(i, size=SIZE), dtype=np.uint8) for i in range(count * BATCH)])
    return list(torch.from_numpy(faces).permute(0, 3, 1, 2).contiguous().split(BATCH))


def as_float(batch: torch.Tensor) -> torch.Tensor:
    """A uint8 batch in [-1, 1] with our loader's normalisation: what the peer's DataLoader yields."""
    return to_device({"image": batch}, "cpu")["image"]


def load_peer_models(peer: Path) -> ModuleType:
    """The checkout's model.py with D's `view(-1, 1)` made `view(-1)` (BCELoss wants the label's shape)."""
    source = (peer / "model.py").read_text()
    if "output.view(-1, 1)" not in source:
        raise SystemExit(f"{peer / 'model.py'}: not the expected context_encoder_pytorch model.py")
    spec = importlib.util.spec_from_loader("peer_model", loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(source.replace("output.view(-1, 1)", "output.view(-1)"), str(peer / "model.py"), "exec"),
         module.__dict__)
    return module


def peer_loop_body(peer: Path) -> str:
    """The inner training loop of the checkout's train.py, from `real_cpu, _ = data` to the print."""
    lines = (peer / "train.py").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "real_cpu, _ = data" in line)
    end = next(i for i, line in enumerate(lines) if i > start and line.strip().startswith("print("))
    return textwrap.dedent("\n".join(lines[start:end])).replace("opt.imageSize/2", "opt.imageSize//2")


def peer_step(peer: Path) -> Callable[[torch.Tensor], None]:
    """One step of the peer's loop on a batch, set up as its train.py sets it up (defaults, overlapPred 0)."""
    models = load_peer_models(peer)
    opt = SimpleNamespace(batchSize=BATCH, imageSize=SIZE, ngf=64, ndf=64, nc=3, nef=64, nBottleneck=4000,
                          overlapPred=0, wtl2=0.998, lr=0.0002, beta1=0.5, ngpu=1)

    def weights_init(m: torch.nn.Module) -> None:  # as in the peer's train.py
        classname = m.__class__.__name__
        if classname.find("Conv") != -1:
            m.weight.data.normal_(0.0, 0.02)
        elif classname.find("BatchNorm") != -1:
            m.weight.data.normal_(1.0, 0.02)
            m.bias.data.fill_(0)

    netG, netD = models._netG(opt), models._netlocalD(opt)
    netG.apply(weights_init)
    netD.apply(weights_init)
    scope = {
        "opt": opt, "netG": netG, "netD": netD, "torch": torch, "wtl2": opt.wtl2, "overlapL2Weight": 10,
        "criterion": torch.nn.BCELoss(), "criterionMSE": torch.nn.MSELoss(),
        "input_real": torch.FloatTensor(BATCH, 3, SIZE, SIZE), "input_cropped": torch.FloatTensor(BATCH, 3, SIZE, SIZE),
        "label": torch.FloatTensor(BATCH), "real_label": 1, "fake_label": 0,
        "real_center": torch.FloatTensor(BATCH, 3, SIZE // 2, SIZE // 2),
        "optimizerD": torch.optim.Adam(netD.parameters(), lr=opt.lr, betas=(opt.beta1, 0.999)),
        "optimizerG": torch.optim.Adam(netG.parameters(), lr=opt.lr, betas=(opt.beta1, 0.999)),
    }
    body = compile(peer_loop_body(peer), str(peer / "train.py"), "exec")

    def step(images: torch.Tensor) -> None:
        scope["data"] = (images, None)
        exec(body, scope)

    return step


def our_step(run_root: Path) -> Callable[[torch.Tensor], None]:
    """One `GanTraining.step` of paper.yaml with Pathak's D (judging the hole), fp32 on the CPU."""
    cfg = load_config(REPO / "configs" / "paper.yaml", [
        "discriminator.kind=pathak", f"train.batch_size={BATCH}", "train.mixed_precision=no", "train.cpu=true",
        f"run.root={run_root}", "run.name=peer-bench"])
    job = GanTraining(cfg, TrainingSession(cfg, "train-pathak", cfg.train))
    return lambda images: job.step({"image": images})


def images_per_second(step: Callable[[torch.Tensor], None], batches: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    for images in batches:
        step(images)
    return len(batches) * BATCH / (time.perf_counter() - start)


def step_flops_per_image(step: Callable[[torch.Tensor], None], images: torch.Tensor) -> float:
    with FlopCounterMode(display=False) as counter:
        step(images)
    return counter.get_total_flops() / images.shape[0]


def side_process(name: str, peer: Path, threads: int, steps: int, conn: Connection) -> None:
    """One side ("peer" or "ours") in its own process: sends its FLOPs per image (the counted step is
    also its warm-up), then the img/s of `steps` timed steps each time it receives True."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    batches = synthetic_batches(steps)
    with tempfile.TemporaryDirectory() as runs:
        if name == "peer":
            step, inputs = peer_step(peer), [as_float(batch) for batch in batches]
        else:
            step, inputs = our_step(Path(runs)), batches
        conn.send(step_flops_per_image(step, inputs[0]))
        while conn.recv():
            conn.send(images_per_second(step, inputs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer", type=Path, required=True, help="checkout of BoyuanJiang/context_encoder_pytorch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round and side")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    spawn = multiprocessing.get_context("spawn")
    sides, processes = {}, []
    for name in ("peer", "ours"):
        conn, child = spawn.Pipe()
        process = spawn.Process(target=side_process, args=(name, args.peer, args.threads, args.steps, child))
        process.start()
        sides[name], processes = conn, [*processes, process]
    flops = {name: conn.recv() for name, conn in sides.items()}
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for round_index in range(args.rounds):
        for name, conn in sides.items():
            conn.send(True)
            rates[name].append(conn.recv())
            print(f"round {round_index + 1}: {name} {rates[name][-1]:.3f} img/s", flush=True)
    for conn in sides.values():
        conn.send(False)
    for process in processes:
        process.join()
    median = {name: statistics.median(values) for name, values in rates.items()}
    result = {"threads": args.threads, "batch": BATCH, "image_size": SIZE, "rounds": args.rounds,
              "steps_per_round": args.steps, "img_per_s": rates, "median_img_per_s": median,
              "ratio_ours_to_peer": median["ours"] / median["peer"],
              "gflop_per_image_step": {name: value / 1e9 for name, value in flops.items()}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
