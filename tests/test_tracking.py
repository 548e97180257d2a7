"""metrics.jsonl on resume: records past the checkpoint dropped, a line cut by a kill tolerated."""

from __future__ import annotations

import json

import pytest

from hybridgan.tracking import MetricsLogger, append_record, read_records, set_aside_torn_line


def test_resume_drops_later_records_and_a_truncated_last_line(tmp_path):
    lines = [json.dumps({"step": s, "epoch": 1, "split": "train", "loss": 0.5}) for s in (2, 4, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 8, "epo')
    said = []
    logger = MetricsLogger(tmp_path, enabled=True, resume_step=4, say=said.append)
    logger.scalars("train", 6, 1, {"loss": 0.25})
    assert said == [f"{tmp_path / 'metrics.jsonl'}: its last line was cut mid-write (a crash); moved to "
                    "metrics.jsonl.torn-1, the run goes on",
                    f"{tmp_path / 'metrics.jsonl'}: resuming at step 4: dropping 1 record(s) of steps 6-6, "
                    "which will be trained and logged again"]
    assert (tmp_path / "metrics.jsonl.torn-1").read_text() == '{"step": 8, "epo'
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


def test_a_torn_last_line_is_set_aside_even_when_no_record_is_dropped_and_the_next_record_stays_whole(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "epoch": 1, "split": "train", "loss": 0.5}) for s in (2, 4)]
    path.write_text("\n".join(lines) + '\n{"step": 6, "ep')
    (tmp_path / "metrics.jsonl.torn-1").write_text("an earlier one")
    said = []
    logger = MetricsLogger(tmp_path, enabled=True, resume_step=6, say=said.append)
    logger.scalars("train", 6, 1, {"loss": 0.25})
    logger.close()
    assert said == [f"{path}: its last line was cut mid-write (a crash); moved to metrics.jsonl.torn-2, the run goes on"]
    assert (tmp_path / "metrics.jsonl.torn-2").read_text() == '{"step": 6, "ep'
    assert (tmp_path / "metrics.jsonl.torn-1").read_text() == "an earlier one"
    assert [r["step"] for r in read_records(path)] == [2, 4, 6]
    MetricsLogger(tmp_path, enabled=True, resume_step=6, say=said.append).close()  # the next run resumes
    assert len(said) == 1


def test_a_whole_last_record_without_its_newline_is_completed_not_set_aside(tmp_path):
    path = tmp_path / "launches.jsonl"
    path.write_text('{"start_step": 0}\n{"start_step": 4}')
    assert set_aside_torn_line(path, print) is None
    append_record(path, {"start_step": 8})
    assert [json.loads(line)["start_step"] for line in path.read_text().splitlines()] == [0, 4, 8]
