"""Teacher health (fmri2text/health.py), decoder output health and class-name truth."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from fmri2text.config import Config, EvaluationConfig, PipelineConfig
from fmri2text.decoding import truths
from fmri2text.errors import UserError
from fmri2text.evaluation.evaluate import output_health
from fmri2text.health import HEALTH_FILE, answer_token_stats, teacher_health
from fmri2text.steps import check_teacher_health

EVAL = {"video2text": {"bertscore_f1": 67.6}, "no_video": {"bertscore_f1": 25.0}}


def _annotated(n: int, distinct: int, spread: float, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(1, 4, 16))
    tokens = base + spread * rng.normal(size=(n, 4, 16))
    return {"answers": {f"clip{i}.mp4": f"A red ball number {i % distinct}." for i in range(n)},
            "tokens": tokens}


def test_identical_answers_and_tokens_are_degenerate():
    same = answer_token_stats(["A white star is moving to the right."] * 30, np.ones((30, 4, 8)))
    assert same["distinct_answers"] == 1 and same["token_cosine"] == pytest.approx(1.0)
    varied = answer_token_stats([f"answer {i}" for i in range(30)],
                                np.random.default_rng(0).normal(size=(30, 4, 8)))
    assert varied["distinct_answer_fraction"] == 1.0 and varied["token_cosine"] < 0.5
    h = teacher_health({"training": same}, EVAL, PipelineConfig())
    assert h["degenerate"] and not h["overridden"]
    assert any("1 distinct answer(s) for 30 training clips" in p for p in h["problems"])
    # one answer among few clips: said as such, not as a fraction below the threshold
    few = teacher_health({"test": answer_token_stats(["Same."] * 18, np.eye(18)[:, None])},
                         None, PipelineConfig())
    assert few["problems"] == ["1 distinct answer(s) for 18 test clips (one answer for all)"]
    assert any("cosine 1.0000" in p for p in h["problems"])
    ok = teacher_health({"training": varied}, EVAL, PipelineConfig())
    assert not ok["degenerate"] and ok["teacher_heldout"]["gain"] == pytest.approx(42.6)
    # a teacher no better with the video than without is degenerate by its own score
    flat = {"video2text": {"bertscore_f1": 6.2}, "no_video": {"bertscore_f1": 6.2}}
    bad = teacher_health({"training": varied}, flat, PipelineConfig())
    assert bad["degenerate"] and "only 0.0 above" in bad["problems"][0]


def test_run_stops_at_a_degenerate_teacher_unless_told(tmp_path):
    cfg = Config()
    logged = []
    parts = {"training": _annotated(40, 1, 0.0), "test": _annotated(10, 1, 0.0, 1)}
    with pytest.raises(UserError) as err:
        check_teacher_health(tmp_path, cfg, parts, logged.append)
    msg = str(err.value)
    assert "1 distinct answer(s) for 40 training clips" in msg and "teacher_checkpoint" in msg
    record = json.loads((tmp_path / HEALTH_FILE).read_text())  # written either way
    assert record["degenerate"] and record["training"]["distinct_answers"] == 1
    cfg.pipeline.allow_degenerate_teacher = True
    h = check_teacher_health(tmp_path, cfg, parts, logged.append)
    assert h["degenerate"] and h["overridden"] and any("WARNING" in m for m in logged)
    healthy = {"training": _annotated(40, 20, 1.0), "test": _annotated(10, 8, 1.0, 1)}
    cfg.pipeline.allow_degenerate_teacher = False
    assert not check_teacher_health(tmp_path, cfg, healthy, logged.append)["degenerate"]


def test_output_health_counts_distinct_outputs_and_the_prior():
    rows = [{"subject": "sub-01", "fmri2text": t} for t in ["A red ball.", "a red  ball.", "Prior."]] + \
           [{"subject": "sub-02", "fmri2text": t} for t in ["A star.", "A ring."]]
    h = output_health(rows, "Prior.")
    assert h["subjects"]["sub-01"] == {"n": 3, "distinct": 2, "distinct_fraction": 2 / 3,
                                       "prior_share": 1 / 3}
    assert h["subjects"]["sub-02"]["prior_share"] == 0 and h["total"]["distinct"] == 4
    assert "prior_share" not in output_health(rows, None)["total"]


def test_class_names_are_the_truth_where_there_are_no_captions():
    trials = pd.DataFrame({"captions": [["a caption"], [], []],
                           "class_name": ["ball", "jumping jacks", ""]})
    got, source = truths(trials, np.arange(3), EvaluationConfig())
    assert got == [["a caption"], ["jumping jacks"], None]
    assert source == "captions + class names (template '{class_name}')"
    cfg = EvaluationConfig(class_truth_template="A video of {class_name}.")
    assert truths(trials, np.array([1]), cfg)[0] == [["A video of jumping jacks."]]
    none, source = truths(trials, np.array([1, 2]), EvaluationConfig(truth_without_captions="none"))
    assert none == [None, None] and source == "none"
    with pytest.raises(UserError, match="class_truth_template"):
        truths(trials, np.array([1]), EvaluationConfig(class_truth_template="{class_name} {0}"))
