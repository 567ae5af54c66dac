"""The examples run as a user runs them, in subprocesses, on the tiny config (so CI runs them):
train on a BIDS dataset and export the decoder, then decode one of its runs with it."""

from __future__ import annotations

import json

import pytest

from .example_run import example_run, run_example


@pytest.mark.slow
def test_train_then_decode_examples(tmp_path_factory, tmp_path):
    ex = example_run(tmp_path_factory)  # examples/train_on_your_bids.py --tiny
    model = ex.out / "run" / "model"
    assert f"decoder: {model}" in ex.stdout and "sub-03" in ex.stdout  # the table was printed
    assert sorted(p.name for p in model.iterdir()) == ["README.md", "config.json", "mask.npy",
                                                       "student.safetensors"]

    r = run_example("decode_a_run.py", "--model", model, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in (ex.out / "run" / "predictions.jsonl").read_text().splitlines()]
    assert "60 trials, windows (60, 2, " in r.stdout and "embeddings (60, 64)" in r.stdout
    for row in rows:  # the example prints every trial's answer: the run's own for test trials
        assert f"{row['onset']:7.1f}  {row['fmri2text']}    [{row['stim']}]" in r.stdout
    assert f"{len(rows)} of {len(rows)} test trials of this run decode as in" in r.stdout
