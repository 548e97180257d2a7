"""metrics.jsonl on resume: records past the checkpoint dropped, a line cut by a kill tolerated."""

from __future__ import annotations

import json

import pytest

from hybridgan.tracking import MetricsLogger, read_records


def test_resume_drops_later_records_and_a_truncated_last_line(tmp_path):
    lines = [json.dumps({"step": s, "epoch": 1, "split": "train", "loss": 0.5}) for s in (2, 4, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 8, "epo')
    said = []
    logger = MetricsLogger(tmp_path, enabled=True, resume_step=4, say=said.append)
    logger.scalars("train", 6, 1, {"loss": 0.25})
    assert said == [f"{tmp_path / 'metrics.jsonl'}: resuming at step 4: dropping 1 record(s) of steps 6-6, "
                    "which will be trained and logged again"]
    logger.close()
    assert [(r["step"], r["loss"]) for r in read_records(tmp_path / "metrics.jsonl")] == [(2, 0.5), (4, 0.5), (6, 0.25)]


def test_a_bad_line_inside_the_log_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=f"^{path}:2: not a JSON record"):
        MetricsLogger(tmp_path, enabled=True, resume_step=1)


def test_resume_at_the_last_record_drops_nothing_and_says_nothing(tmp_path):
    lines = [json.dumps({"step": s, "epoch": 1, "split": "train", "loss": 0.5}) for s in (2, 4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    said = []
    MetricsLogger(tmp_path, enabled=True, resume_step=4, say=said.append).close()
    assert said == [] and len(read_records(tmp_path / "metrics.jsonl")) == 2
