"""The paper end to end: pack (if needed) -> pretrain -> train hybrid, pathak, none -> evaluate -> report.

    python -m hybridgan.reproduce --config configs/smoke-cpu.yaml            # synthetic faces, CPU
    python -m hybridgan.reproduce --config configs/paper.yaml --data /data/celeba-hq.zip

Each stage is the same command a user or the Slurm chain runs (`python -m hybridgan.<stage>`), in
its own process, started with `--launcher` (default: this Python; e.g. `"accelerate launch
--multi_gpu --num_processes 8"` on a GPU node). Every stage resumes, so re-running the same
command after an interruption finishes the chain without redoing finished stages. The result is
`runs/<name>/report.md` with Table 1, Table 2, the evaluation table and the figures.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

from hybridgan.atomic import write_text_atomic
from hybridgan.config import Config, add_config_arguments, cli_parser, config_from_args, save_config
from hybridgan.data.manifest import MANIFEST
from hybridgan.pretrain import EXPORT_NAME as DISCRIMINATOR_EXPORT
from hybridgan.report import markdown_table, table1, table2

class StageFailed(RuntimeError):
    """A stage's process exited non-zero; its own one-line error is already on stderr."""


def run_folder(cfg: Config) -> Path:
    return Path(cfg.run.root) / cfg.run.name


def stage_commands(cfg_path: Path, cfg: Config, launcher: list[str]) -> list[tuple[str, list[str], Path | None]]:
    """(name, command, file that makes it unnecessary) of every stage in chain order.

    Only pack can be unnecessary: without `data.source`, when the shards folder holds a finished
    pack. With a source it runs: on a finished identical pack it checks the plan and re-hashes every
    shard (re-packing a damaged one), and on a folder holding a different pack it is the stage that
    says so.
    """
    folder = run_folder(cfg)
    base = ["--config", str(cfg_path)]
    pretrained = folder / "pretrain" / DISCRIMINATOR_EXPORT
    module = [*launcher, "-m"]
    return [
        ("pack", [sys.executable, "-m", "hybridgan.pack", cfg.data.source, "--out", cfg.data.shards, *base],
         None if cfg.data.source else Path(cfg.data.shards) / MANIFEST),
        ("pretrain", [*module, "hybridgan.pretrain", *base], None),
        ("train-hybrid", [*module, "hybridgan.train", *base, "discriminator.kind=hybrid",
                          f"discriminator.pretrained={pretrained}"], None),
        ("train-pathak", [*module, "hybridgan.train", *base, "discriminator.kind=pathak"], None),
        ("train-none", [*module, "hybridgan.train", *base, "discriminator.kind=none"], None),
        ("evaluate", [*module, "hybridgan.evaluate", str(folder / "train-none"), str(folder / "train-pathak"),
                      str(folder / "train-hybrid"), "--out", str(folder / "eval")], None),
    ]


def run_chain(cfg: Config, launcher: list[str]) -> Path:
    """Run every stage in order; returns the report's path.

    A finished training stage is run again too: it resumes at its last step and only re-exports,
    so a re-run costs seconds, and a re-run with a changed config is refused by the stage, naming
    the keys, instead of silently reusing results of another config.
    """
    folder = run_folder(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    cfg_path = folder / "reproduce.yaml"
    save_config(cfg, cfg_path)
    timings: list[tuple[str, str]] = []
    for name, command, output in stage_commands(cfg_path, cfg, launcher):
        if output is not None and output.is_file():
            timings.append((name, "packed before"))
            continue
        print(f"[reproduce] {name}: {shlex.join(command)}", flush=True)
        start = time.perf_counter()
        if subprocess.run(command).returncode != 0:
            raise StageFailed(f"stage {name} failed (command: {shlex.join(command)}); "
                              f"re-run the same reproduce command to resume")
        timings.append((name, f"{time.perf_counter() - start:.1f} s"))
    return write_report(cfg, timings)


def write_report(cfg: Config, timings: list[tuple[str, str]]) -> Path:
    """`runs/<name>/report.md`: Table 1, Table 2, the evaluation table, figures and stage timings."""
    folder = run_folder(cfg)
    evaluation = (folder / "eval" / "eval.md").read_text()
    text = "\n".join([
        f"# hybridgan report: {cfg.run.name}",
        "",
        f"Data: `{cfg.data.source or cfg.data.shards}` packed in `{cfg.data.shards}`, "
        f"{cfg.data.image_size}x{cfg.data.image_size} images, {cfg.mask.kind} hole of {cfg.mask.hole_size}.",
        "",
        "## Table 1: pre-training of the hybrid discriminator (held-out test split)",
        "",
        table1(folder / "pretrain"),
        "",
        "## Table 2: losses of the last three epochs, Pathak's CNN discriminator vs the hybrid",
        "",
        table2(folder / "train-hybrid", folder / "train-pathak"),
        "",
        "## Evaluation on the test split (inside the hole)",
        "",
        evaluation.strip(),
        "",
        "![test faces: original | masked | none | Pathak | hybrid | OpenCV Telea, with hole metrics](eval/figure.png)",
        "",
        "![Table 2 losses per epoch](eval/losses.png)",
        "",
        "## Stages",
        "",
        markdown_table(["stage", "wall time"], timings),
        "",
    ])
    path = folder / "report.md"
    write_text_atomic(path, text)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = cli_parser("hybridgan.reproduce", __doc__.splitlines()[0], [
        "python -m hybridgan.reproduce --config configs/smoke-cpu.yaml",
        "python -m hybridgan.reproduce --config configs/paper.yaml --data /data/celeba-hq.zip",
        "python -m hybridgan.reproduce --config configs/paper.yaml --launcher 'accelerate launch --num_processes 8'"])
    add_config_arguments(parser)
    parser.add_argument("--data", help="images to pack: a folder, a .zip or synthetic:N (default: data.source)")
    parser.add_argument("--launcher", default=sys.executable,
                        help="how training stages are started, e.g. 'accelerate launch --num_processes 8'")
    args = parser.parse_args(argv)
    if args.data:
        args.overrides = [f"data.source={args.data}", *args.overrides]
    cfg = config_from_args(args)
    if not cfg.data.source and not (Path(cfg.data.shards) / MANIFEST).is_file():
        raise SystemExit(f"error: {cfg.data.shards} holds no pack and no data.source is set: pass --data PATH")
    start = time.perf_counter()
    try:
        report = run_chain(cfg, shlex.split(args.launcher))
    except (StageFailed, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    print(f"[reproduce] done in {time.perf_counter() - start:.0f} s: report at {report}")


if __name__ == "__main__":
    main()
