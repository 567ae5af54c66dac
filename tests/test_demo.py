"""End to end through the real CLI on a tiny config: simulate → responses → ridge → evaluate."""

import json
import os
import subprocess
import sys

import pytest

TINY = ["simulate.subjects=3", "simulate.runs=1", "simulate.classes=6", "simulate.resolution=8",
        "simulate.web_clips=4", "split.n_heldout=1", "evaluation.n_permutations=300"]
METRIC_KEYS = {"bertscore_p", "bertscore_r", "bertscore_f1", "bleu1", "bleu2", "rougeL_p",
               "rougeL_r", "rougeL_f"}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "fmri2text.cli", "demo", "--out", str(out), *TINY],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_demo_writes_the_contract(demo_run):
    out, r = demo_run
    m = json.loads((out / "metrics.json").read_text())
    assert {"scorer", "subjects", "total", "controls", "p_values", "n_test_trials",
            "vs_truth"} <= set(m)
    assert list(m["subjects"]) == ["sub-03"]
    assert METRIC_KEYS <= set(m["total"]) and METRIC_KEYS <= set(m["subjects"]["sub-03"])
    assert {"shuffled", "prompt_only"} <= set(m["controls"]) and m["decoder"] == "ridge"
    assert "minilm" in json.dumps(m["scorer"]).lower()  # the scorer names its model
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == m["n_test_trials"] > 0
    row = json.loads(lines[0])
    assert {"subject", "run", "onset", "stim", "instruction", "video2text", "fmri2text",
            "truth"} <= set(row)
    assert (out / "config.yaml").is_file() and (out / "report.html").is_file()
    assert "sub-03" in r.stdout and "Total" in r.stdout


def test_ridge_beats_shuffled_control(demo_run):
    m = json.loads((demo_run[0] / "metrics.json").read_text())
    for key in ("bertscore_f1", "bleu1"):
        assert m["total"][key] > m["controls"]["shuffled"][key] + 5, key
        assert m["p_values"][key] < 0.05, key  # ~30 test trials here; the full demo has more
