"""Text metrics and retrieval: hand-checkable values and agreement with the reference libraries."""

import numpy as np
import pytest

from fmri2text.config import EvaluationConfig
from fmri2text.errors import UserError
from fmri2text.evaluation.metrics import TEXT_KEYS, TextScorer, retrieval_metrics

HYPS = ["A red ball bounces on the grass.", "A blue cube spins.", "the cat",
        "A green triangle is sliding to the left.", "nothing here", "running dogs quickly run"]
REFS = [["A red ball is bouncing on grass.", "A ball bounces."], ["A blue cube is spinning in the sky."],
        ["a dog sits"], ["A green triangle slides left on the grass."], ["Something happens."],
        ["The dog runs quickly."]]


@pytest.fixture(scope="module")
def scorer() -> TextScorer:
    return TextScorer(EvaluationConfig())


def test_identical_and_disjoint_texts(scorer):
    same = scorer.score(["A red ball bounces.", "A blue cube spins on grass."],
                        ["A red ball bounces.", "A blue cube spins on grass."])
    for key in ("bleu1", "bleu2", "rougeL_p", "rougeL_r", "rougeL_f", "bleu1_sentence"):
        assert same[key] == pytest.approx(100.0)
    assert same["bertscore_f1"] == pytest.approx(100.0, abs=1e-3)
    disjoint = scorer.score(["red ball bounces"], ["blue cube spins"])
    assert disjoint["bleu1"] == 0.0 and disjoint["bleu2"] == 0.0
    assert disjoint["rougeL_f"] == 0.0
    assert set(TEXT_KEYS) <= set(disjoint)


def test_bertscore_equals_bert_score_library(scorer):
    import bert_score

    from fmri2text.models.zoo import minilm_path

    for idf in (False, True):
        cfg = EvaluationConfig(bertscore_idf=idf)
        tables = TextScorer(cfg).pairwise(HYPS, REFS)
        P, R, F = bert_score.score(HYPS, REFS, model_type=str(minilm_path()),
                                   num_layers=cfg.bertscore_layers, idf=idf)
        for name, ref in (("bertscore_p", P), ("bertscore_r", R), ("bertscore_f1", F)):
            ours = tables.t[name][tables.hyp_of, tables.ref_of] / 100  # per pair
            np.testing.assert_allclose(ours, ref.numpy(), atol=2e-5)


def test_bleu_and_rouge_equal_libraries(scorer):
    import sacrebleu
    from rouge_score import rouge_scorer

    m = scorer.score(HYPS, REFS)
    width = max(len(r) for r in REFS)
    streams = [[r[k] if k < len(r) else None for r in REFS] for k in range(width)]
    for order in (1, 2):
        corpus = sacrebleu.BLEU(max_ngram_order=order).corpus_score(HYPS, streams).score
        sent = np.mean([sacrebleu.BLEU(max_ngram_order=order, effective_order=True)
                        .sentence_score(h, r).score for h, r in zip(HYPS, REFS)])
        assert m[f"bleu{order}"] == pytest.approx(corpus, abs=1e-9)
        assert m[f"bleu{order}_sentence"] == pytest.approx(sent, abs=1e-9)
    rs = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    best = [rs.score_multi(r, h)["rougeL"] for h, r in zip(HYPS, REFS)]
    assert m["rougeL_f"] == pytest.approx(100 * np.mean([s.fmeasure for s in best]), abs=1e-9)
    assert m["rougeL_p"] == pytest.approx(100 * np.mean([s.precision for s in best]), abs=1e-9)
    assert m["rougeL_r"] == pytest.approx(100 * np.mean([s.recall for s in best]), abs=1e-9)


def test_empty_hypothesis_scores_zero(scorer):
    m = scorer.score([""], ["A red ball bounces."])
    assert m["bertscore_f1"] == 0.0 and m["bleu1"] == 0.0 and m["rougeL_f"] == 0.0


def test_identity_records_backbone(scorer):
    ident = scorer.identity()
    assert ident["bertscore"]["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert ident["bertscore"]["num_layers"] == 6 and ident["bertscore"]["idf"] is False
    assert "bert-score" in ident["versions"]


def test_bad_model_or_rescale_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="bertscore_model"):
        TextScorer(EvaluationConfig(bertscore_model=str(tmp_path / "nope")))
    with pytest.raises(UserError, match="rescale baseline"):
        TextScorer(EvaluationConfig(bertscore_rescale=True))


def test_retrieval_perfect_and_chance_levels():
    rng = np.random.default_rng(0)
    cand = rng.normal(size=(50, 16))
    perfect = retrieval_metrics(cand + 0.01 * rng.normal(size=cand.shape), cand)
    assert perfect["top1"] == 100.0 and perfect["top5"] == 100.0 and perfect["twoway"] == 100.0
    assert perfect["top1_chance"] == pytest.approx(2.0) and perfect["top5_chance"] == pytest.approx(10.0)
    assert perfect["twoway_chance"] == 50.0
    rand = retrieval_metrics(rng.normal(size=(2000, 16)), cand, rng.integers(0, 50, 2000))
    assert rand["top1"] == pytest.approx(2.0, abs=1.5)
    assert rand["top5"] == pytest.approx(10.0, abs=3.0)
    assert rand["twoway"] == pytest.approx(50.0, abs=3.0)


def test_retrieval_ties_count_as_expected_rank_with_chance_from_the_same_count():
    rng = np.random.default_rng(1)
    # all identical candidates: every score is its chance level, never 100 %
    same = np.ones((8, 5))
    out = retrieval_metrics(rng.normal(size=(30, 5)), same, rng.integers(0, 8, 30))
    assert out["n_candidates"] == 8 and out["n_distinct_candidates"] == 1
    assert out["top1"] == pytest.approx(out["top1_chance"]) == pytest.approx(12.5)
    assert out["top5"] == pytest.approx(out["top5_chance"]) == pytest.approx(62.5)
    assert out["twoway"] == pytest.approx(50.0)
    # partly identical: 4 distinct vectors, each 3 times; a perfect prediction finds its
    # group of 3, so it is first with chance 1/3, in the top 5 surely, and beats the 9 others
    cand = np.repeat(np.eye(4), 3, axis=0)  # 12 rows
    out = retrieval_metrics(cand, cand)
    assert out["n_candidates"] == 12 and out["n_distinct_candidates"] == 4
    assert out["top1_chance"] == pytest.approx(100 / 12) and out["top1"] == pytest.approx(100 / 3)
    assert out["top5"] == pytest.approx(100.0)
    assert out["twoway"] == pytest.approx((9 + 0.5 * 2) / 11 * 100)
    # distinct: the same as without tie handling
    cand = rng.normal(size=(6, 5))
    out = retrieval_metrics(cand, cand)
    assert out["top1"] == 100.0 and out["twoway"] == 100.0 and out["n_distinct_candidates"] == 6
    # four candidates surely closer, the truth tied with two copies of itself: it is 5th,
    # 6th or 7th with equal chance, so top-5 is 1/3 and top-1 0
    cand = np.array([[1.0, 0.0], [1.0, 0.5], [1.0, 0.4], [1.0, 0.6], [1.0, 0.3], [1.0, 0.0],
                     [1.0, 0.0], [-1.0, 0.0]])
    out = retrieval_metrics(np.array([[1.0, 0.5]]), cand, np.array([0]))
    assert out["top1"] == 0.0 and out["top5"] == pytest.approx(100 / 3)
    assert out["twoway"] == pytest.approx((1 + 0.5 * 2) / 7 * 100)


def test_bertscore_is_the_same_bytes_in_every_process():
    """Texts of one word count are embedded in text order, not in the set's order (which
    follows each process's string hashing): with small batches the padded shapes, and so
    the scores' last bits, followed it (two cold demos' metrics.json differed there)."""
    from tests.hash_seeds import outputs_under_hash_seeds

    code = ("import sys; from fmri2text.config import EvaluationConfig; "
            "from fmri2text.evaluation.metrics import TextScorer; "
            "hyps = [f'A {c} {s}.' for c in ('red', 'qzxv', 'blue', 'pink', 'zzqv', 'gold') "
            "for s in ('ball', 'star', 'xqzb')]; refs = ['A red ball.'] * len(hyps); "
            "s = TextScorer(EvaluationConfig(bertscore_batch_size=4)).score(hyps, refs); "
            "sys.stdout.write(repr(s['bertscore_f1']))")
    outs = outputs_under_hash_seeds(code)
    assert len(outs) == 1, outs
