"""evaluate(): the metrics.json contract, controls, permutation p-values, input checks."""

import json

import numpy as np
import pytest

from fmri2text.config import EvaluationConfig
from fmri2text.errors import UserError
from fmri2text.evaluation.evaluate import (check_predictions, evaluate, format_table,
                                           paired_pvalues, permutation_pvalues, read_predictions,
                                           shuffle_within_subject)
from fmri2text.evaluation.metrics import PairTables, TextScorer

CONTRACT_TOP = {"scorer", "subjects", "total", "controls", "p_values", "n_test_trials", "vs_truth"}
CONTRACT_METRICS = {"bertscore_p", "bertscore_r", "bertscore_f1", "bleu1", "bleu2", "rougeL_p",
                    "rougeL_r", "rougeL_f"}
RETRIEVAL = {"top1", "top5", "twoway"}
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["ball", "cube", "triangle", "star"]
ACTIONS = ["bounces", "spins", "slides to the left", "grows", "orbits"]


def captions(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"A {rng.choice(COLOURS)} {rng.choice(SHAPES)} {rng.choice(ACTIONS)} near a "
            f"{rng.choice(['tree', 'house', 'lake'])}." for _ in range(n)]


def rows(hyps, refs, truth=None, subjects=None):
    subjects = subjects or [f"sub-0{i % 2 + 1}" for i in range(len(hyps))]
    return [{"subject": s, "run": 1, "onset": float(4 * i), "stim": f"clip{i}.mp4",
             "instruction": "Describe the video.", "video2text": r, "fmri2text": h,
             "truth": None if truth is None else truth[i]}
            for i, (s, h, r) in enumerate(zip(subjects, hyps, refs))]


@pytest.fixture(scope="module")
def scorer() -> TextScorer:
    return TextScorer(EvaluationConfig())


def test_metrics_json_follows_the_contract(scorer):
    n = 12
    refs = captions(n, 0)
    truth = [[c, c.replace("A ", "One ")] for c in captions(n, 1)]
    pred = rows(refs, refs, truth)
    controls = {"shuffled": rows(captions(n, 2), refs, truth), "ridge": rows(captions(n, 3), refs, truth)}
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(n, 8))
    cfg = EvaluationConfig(n_permutations=50)
    m = evaluate(pred, controls, scorer, cfg, retrieval={"pred": emb, "candidates": emb})
    assert CONTRACT_TOP <= set(m)
    assert m["reference"] == "video2text" and m["n_test_trials"] == n
    assert set(m["subjects"]) == {"sub-01", "sub-02"}
    for metrics in [m["total"], *m["subjects"].values()]:
        assert CONTRACT_METRICS | RETRIEVAL <= set(metrics)
    assert set(m["controls"]) == {"shuffled", "ridge"}  # absent prompt_only is omitted
    for metrics in m["controls"].values():
        assert CONTRACT_METRICS <= set(metrics)
    assert {"bertscore_f1", "bleu1", "rougeL_f"} <= set(m["p_values"])
    assert {"subjects", "total", "controls", "paired"} <= set(m["vs_truth"])
    assert m["total"]["bleu1"] == pytest.approx(100.0) and m["total"]["top1"] == 100.0
    assert m["controls"]["shuffled"]["bleu1"] < m["total"]["bleu1"]
    # the paired test of the decoder against each control, per subject and in total
    paired = m["paired"]["controls"]
    assert set(paired) == {"shuffled", "ridge"}
    for name in paired:
        assert set(paired[name]["subjects"]) == {"sub-01", "sub-02"}
        for part in [paired[name]["total"], *paired[name]["subjects"].values()]:
            assert set(part) == {"bertscore_f1", "bleu1"} and 0 < part["bleu1"]["p"] <= 1
        gap = m["total"]["bleu1"] - m["controls"][name]["bleu1"]
        assert paired[name]["total"]["bleu1"]["difference"] == pytest.approx(gap)
    json.dumps(m, allow_nan=False)  # serialisable as metrics.json
    table = format_table(m)
    assert "sub-01" in table and "Total" in table and "shuffled" in table
    p_ridge = paired["ridge"]["total"]["bleu1"]["p"]
    ridge_rows = [line for line in table.splitlines() if line.startswith("│   ridge")]
    assert len(ridge_rows) == 3 and f"{p_ridge:.4f}" in ridge_rows[-1]  # on Total's ridge row


def test_truth_is_the_reference_without_video2text(scorer):
    caps = captions(6, 4)
    m = evaluate(rows(caps, [None] * 6, [[c] for c in caps]), {}, scorer,
                 EvaluationConfig(n_permutations=20))
    assert m["reference"] == "truth" and m["total"]["rougeL_f"] == pytest.approx(100.0)
    assert m["controls"] == {}


def test_pvalue_of_perfect_and_random_decoder(scorer):
    n, n_perm = 16, 200
    refs = captions(n, 5)
    subjects = np.array([f"sub-0{i % 2 + 1}" for i in range(n)])
    perfect = scorer.pairwise(refs, refs)
    p = permutation_pvalues(perfect, subjects, n_perm, seed=0)
    for key in ("bertscore_f1", "bleu1", "rougeL_f"):
        assert p[key] == pytest.approx(1 / (1 + n_perm))
    random = scorer.pairwise(captions(n, 6), refs)
    p = permutation_pvalues(random, subjects, n_perm, seed=0)
    for key in ("bertscore_f1", "bleu1", "rougeL_f"):
        assert p[key] > 0.05


def test_paired_test_of_decoder_against_a_control(scorer):
    n, n_perm = 16, 400
    refs = captions(n, 7)
    perfect, random = scorer.pairwise(refs, refs), scorer.pairwise(captions(n, 8), refs)
    ahead = paired_pvalues(perfect, random, n_perm, seed=0)
    behind = paired_pvalues(random, perfect, n_perm, seed=0)
    for key in ("bertscore_f1", "bleu1"):
        assert ahead[key]["p"] == pytest.approx(1 / (1 + n_perm))  # no swap does better
        assert ahead[key]["difference"] > 0 and behind[key]["difference"] < 0
        assert behind[key]["p"] > 0.99
    same = paired_pvalues(random, random, n_perm, seed=0)  # every swap ties: p = 1
    assert same["bleu1"] == {"difference": 0.0, "p": 1.0}
    half = np.arange(n // 2)  # a subset of trials (one subject's)
    assert paired_pvalues(perfect, random, n_perm, 0, trials=half)["bleu1"]["p"] < 0.01


def _synthetic(values: np.ndarray) -> PairTables:
    """Tables whose trial i has BERTScore-F1 values[i] (one hypothesis and reference each)."""
    n = len(values)
    return PairTables(np.arange(n), np.arange(n), {"bertscore_f1": np.diag(values)},
                      np.ones(n, dtype=np.int64), np.ones((n, 2), dtype=np.int64))


def test_paired_test_holds_its_level_and_sees_a_shift():
    """Decoder and control from one distribution: p <= 0.1 in about a tenth of the worlds
    (a valid test); with a real lead of half a standard deviation per trial it is found."""
    rng = np.random.default_rng(0)
    n, worlds, n_perm = 40, 200, 199
    p_null = [paired_pvalues(_synthetic(rng.normal(60, 10, n)), _synthetic(rng.normal(60, 10, n)),
                             n_perm, seed=w, keys=("bertscore_f1",))["bertscore_f1"]["p"]
              for w in range(worlds)]
    assert 0.04 <= np.mean(np.array(p_null) <= 0.1) <= 0.18
    p_lead = [paired_pvalues(_synthetic(rng.normal(65, 10, n)), _synthetic(rng.normal(60, 10, n)),
                             n_perm, seed=w, keys=("bertscore_f1",))["bertscore_f1"]["p"]
              for w in range(50)]
    assert np.mean(np.array(p_lead) <= 0.1) >= 0.6


def test_shuffle_within_subject_moves_every_trial_within_its_subject():
    subjects = np.array(["a"] * 5 + ["b"] * 7)
    X = np.arange(12)[:, None] * np.ones((1, 3))
    Xp = shuffle_within_subject(X, subjects, seed=1)
    src = Xp[:, 0].astype(int)
    assert sorted(src) == list(range(12))  # a permutation
    assert np.all(src != np.arange(12))  # no trial keeps its own fMRI
    assert np.all(subjects[src] == subjects)
    assert np.array_equal(Xp, shuffle_within_subject(X, subjects, seed=1))


def test_check_predictions_names_file_and_missing_fields(tmp_path):
    good = rows(["a"], ["b"])
    check_predictions(good, "p.jsonl")
    bad = [{k: v for k, v in good[0].items() if k not in ("fmri2text", "stim")}]
    with pytest.raises(UserError) as err:
        check_predictions(bad, tmp_path / "predictions.jsonl")
    text = str(err.value)
    assert "predictions.jsonl" in text and "fmri2text" in text and "stim" in text and "line 1" in text
    path = tmp_path / "predictions.jsonl"
    path.write_text(json.dumps(good[0]) + "\n{not json\n")
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        read_predictions(path)
    with pytest.raises(UserError, match="not found"):
        read_predictions(tmp_path / "missing.jsonl")


def test_misaligned_control_and_missing_reference_are_user_errors(scorer):
    pred = rows(["a b", "c d"], ["a b", "c d"])
    with pytest.raises(UserError, match="controls/shuffled.jsonl"):
        evaluate(pred, {"shuffled": pred[::-1]}, scorer, EvaluationConfig(n_permutations=5))
    with pytest.raises(UserError, match="neither video2text nor truth"):
        evaluate(rows(["a"], [None]), {}, scorer, EvaluationConfig(n_permutations=5))
