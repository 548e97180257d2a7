"""A sweep of one loss key (beta by default): the same G trained at each value, then the frontier.

    python -m hybridgan.sweep --config configs/folder-1k-cpu.yaml --kind pathak --values 0.001,0.003,0.01,0.03
    python -m hybridgan.sweep --config configs/paper.yaml --kind hybrid --key loss.adaptive_scale --values 0.05,0.1,0.2

Every value trains `discriminator.kind=KIND` with the same data, steps and seeds, plus one generator
without a discriminator (the reference every value is measured against); each is the ordinary train
stage in `runs/<name>/sweep-<key>/<value>/train-<kind>/` (so each resumes when re-run). The hybrid
D starts from the run folder's own pretraining export, as in the chain. Then one `evaluate` pass
over all of them writes `runs/<name>/sweep-<key>/eval/` (eval.json, eval.md, figure.png), and the
sweep adds `frontier.png` (PSNR in the hole against the fill's high-frequency energy over the
original's, one point per value) and `sweep.md` (the table behind it), which `reproduce`'s report
links when present.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from hybridgan.atomic import write_text_atomic
from hybridgan.config import Config, add_config_arguments, cli_parser, config_from_args
from hybridgan.pretrain import EXPORT_NAME as DISCRIMINATOR_EXPORT
from hybridgan.report import hf_gap, markdown_table

EXAMPLES = [
    "python -m hybridgan.sweep --config configs/folder-1k-cpu.yaml --kind pathak --values 0.001,0.003,0.01,0.03",
    "python -m hybridgan.sweep --config configs/paper.yaml --kind hybrid --key loss.adaptive_scale --values 0.05,0.1,0.2",
]
NONE_LABEL = "none"


class SweepError(RuntimeError):
    """A stage of the sweep failed; its own one-line error is already on stderr."""


def sweep_folder(cfg: Config, key: str) -> Path:
    return Path(cfg.run.root) / cfg.run.name / f"sweep-{key}"


def train_commands(cfg: Config, config_path: str, overrides: list[str], kind: str, key: str,
                   values: list[str], launcher: list[str]) -> list[tuple[str, list[str], Path]]:
    """(label, command, stage folder) of the no-D reference and of every value."""
    folder = sweep_folder(cfg, key)
    base = [*launcher, "-m", "hybridgan.train", "--config", config_path, *overrides]
    pretrained = Path(cfg.run.root) / cfg.run.name / "pretrain" / DISCRIMINATOR_EXPORT
    plan = [(NONE_LABEL, [*base, f"run.root={folder}", f"run.name={NONE_LABEL}", "discriminator.kind=none"],
             folder / NONE_LABEL / "train-none")]
    for value in values:
        command = [*base, f"run.root={folder}", f"run.name={value}", f"discriminator.kind={kind}", f"{key}={value}"]
        if kind == "hybrid" and not cfg.discriminator.pretrained:
            command.append(f"discriminator.pretrained={pretrained}")
        plan.append((value, command, folder / value / f"train-{kind}"))
    return plan


def run(command: list[str], what: str) -> None:
    print(f"[sweep] {what}: {shlex.join(command)}", flush=True)
    if subprocess.run(command).returncode != 0:
        raise SweepError(f"{what} failed (command: {shlex.join(command)}); re-run the same sweep to resume")


def frontier_rows(results: dict[str, Any], labels: list[str]) -> list[dict[str, Any]]:
    """One row per label (in the order of `labels`) from evaluate's eval.json `results`."""
    rows = []
    for label, row in zip(labels, results["runs"]):
        m = row["metrics"]
        rows.append({"value": label, "psnr": m["psnr"], "sharpness": m["sharpness"],
                     "hf_gap": hf_gap([m["sharpness"]])[0], "detail": m["detail"],
                     "checkerboard": m["checkerboard"], "checkerboard_ref": m["checkerboard_ref"],
                     "edge_jump": m["edge_jump"], "edge_jump_ref": m["edge_jump_ref"], "lpips": m.get("lpips")})
    return rows


def frontier_png(rows: list[dict[str, Any]], key: str, path: Path) -> Path:
    """PSNR against the fill's high-frequency energy over the original's, one labelled point per row."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 4))
    xs, ys = [r["sharpness"] for r in rows], [r["psnr"] for r in rows]
    axis.plot(xs, ys, "o-", color="tab:blue")
    for row in rows:
        axis.annotate(row["value"], (row["sharpness"], row["psnr"]), textcoords="offset points", xytext=(4, 4))
    axis.axvline(1.0, color="grey", linestyle=":", label="the original's energy")
    axis.set_xlabel("high-frequency energy of the fill / the original's")
    axis.set_ylabel("PSNR in the hole (dB)")
    axis.set_title(f"sweep of {key}")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def sweep_markdown(rows: list[dict[str, Any]], key: str, kind: str, eval_md: str) -> str:
    table = [[r["value"], f"{r['psnr']:.2f}", f"{r['sharpness']:.3f}", f"{r['hf_gap']:.3f}", f"{r['detail']:.3f}",
              f"{r['checkerboard']:.2f} ({r['checkerboard_ref']:.2f})", f"{r['edge_jump']:.1f} ({r['edge_jump_ref']:.1f})",
              "-" if r["lpips"] is None else f"{r['lpips']:.4f}"] for r in rows]
    headers = [key, "PSNR (dB)", "hf energy / original", "hf gap |ln|", "in-place detail",
               "checkerboard (original)", "seam (original)", "LPIPS"]
    return "\n".join([f"# Sweep of {key} ({kind} D; `{NONE_LABEL}`: no discriminator)", "",
                      markdown_table(headers, table), "", "![PSNR against high-frequency energy](frontier.png)", "",
                      "## The evaluation behind it", "", eval_md.strip(), ""])


def main(argv: list[str] | None = None) -> None:
    parser = cli_parser("hybridgan.sweep", __doc__.splitlines()[0], EXAMPLES)
    add_config_arguments(parser)
    parser.add_argument("--kind", choices=("hybrid", "pathak"), default="pathak", help="the discriminator swept")
    parser.add_argument("--key", default="loss.beta", help="the dotted config key swept (default loss.beta)")
    parser.add_argument("--values", required=True, help="comma-separated values, e.g. 0.001,0.003,0.01")
    parser.add_argument("--launcher", default=sys.executable, help="how the train stages are started")
    args = parser.parse_args(argv)
    values = [v.strip() for v in args.values.split(",") if v.strip()]
    for value in values:  # a bad value is refused, naming the key, before anything trains
        config_from_args(argparse.Namespace(config=args.config, overrides=[*args.overrides, f"{args.key}={value}"]))
    cfg = config_from_args(args)
    plan = train_commands(cfg, args.config, args.overrides, args.kind, args.key, values, shlex.split(args.launcher))
    folder = sweep_folder(cfg, args.key)
    try:
        for label, command, _ in plan:
            run(command, f"train {label}")
        run([sys.executable, "-m", "hybridgan.evaluate", *(str(stage) for _, _, stage in plan),
             "--out", str(folder / "eval")], "evaluate")
    except SweepError as err:
        raise SystemExit(f"error: {err}") from None
    results = json.loads((folder / "eval" / "eval.json").read_text())
    rows = frontier_rows(results, [label for label, _, _ in plan])
    frontier_png(rows, args.key, folder / "frontier.png")
    write_text_atomic(folder / "sweep.md", sweep_markdown(rows, args.key, args.kind,
                                                          (folder / "eval" / "eval.md").read_text()))
    print(f"[sweep] wrote {folder}/sweep.md and frontier.png")


if __name__ == "__main__":
    main()
