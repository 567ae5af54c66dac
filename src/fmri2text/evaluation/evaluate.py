"""Evaluation with controls and permutation p-values → metrics.json (DESIGN §5 contract).

``evaluate`` scores the decoder's predictions per held-out subject and in total against the
primary reference (Video2Text, or the true captions where no teacher exists), scores each
control (shuffled fMRI, prompt-only, ridge) the same way, adds retrieval where embeddings
are given, permutation p-values of the real pairing against within-subject shuffled
pairings, a paired test of the decoder against each control on the same trials
(:func:`paired_pvalues`), and repeats the text scores against the true captions
(``vs_truth``).
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np

from fmri2text.config import EvaluationConfig
from fmri2text.errors import UserError
from fmri2text.evaluation.metrics import (TEXT_KEYS, PairTables, TextScorer, corpus_value,
                                          retrieval_metrics)

REQUIRED_FIELDS = ("subject", "run", "onset", "stim", "instruction", "video2text", "fmri2text")
CONTROLS = ("shuffled", "prompt_only", "ridge")
#: metrics of the paired decoder-against-control test (the table's p columns)
PAIRED_KEYS = ("bertscore_f1", "bleu1")
#: what one reference's section of metrics.json holds (primary and vs_truth alike)
SECTION_KEYS = ("subjects", "total", "controls", "controls_subjects", "p_values", "permutation",
                "paired")
_FIX = "write predictions with `fmri2text decode`, or give every line the fields " + ", ".join(
    REQUIRED_FIELDS) + " (and truth: a list of captions or null)"


# ----------------------------------------------------------------------------- input checks


def check_predictions(rows: list[dict], path: str | Path) -> None:
    """Raise :class:`UserError` naming ``path`` and the line when a prediction row is malformed.

    Every row needs ``subject run onset stim instruction video2text fmri2text``; ``truth``
    is optional (a list of strings or null); ``video2text`` is a string or null.
    """
    if not rows:
        raise UserError("no predictions (the file is empty)", path=path, fix=_FIX)
    for line, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise UserError(f"line {line} is not a JSON object", path=path, fix=_FIX)
        missing = [f for f in REQUIRED_FIELDS if f not in row]
        if missing:
            raise UserError(f"line {line} lacks field(s): {', '.join(missing)}", path=path, fix=_FIX)
        if not isinstance(row["fmri2text"], str):
            raise UserError(f"line {line}: fmri2text must be a string, got {row['fmri2text']!r}",
                            path=path, fix=_FIX)
        if row["video2text"] is not None and not isinstance(row["video2text"], str):
            raise UserError(f"line {line}: video2text must be a string or null, got "
                            f"{row['video2text']!r}", path=path, fix=_FIX)
        truth = row.get("truth")
        if truth is not None and not (isinstance(truth, list) and all(isinstance(t, str) for t in truth)):
            raise UserError(f"line {line}: truth must be a list of strings or null, got {truth!r}",
                            path=path, fix=_FIX)


def read_predictions(path: str | Path) -> list[dict]:
    """Read and check a predictions.jsonl file (one JSON object per line)."""
    path = Path(path)
    if not path.is_file():
        raise UserError("predictions file not found", path=path,
                        fix="run `fmri2text decode` first or pass the right file")
    rows = []
    for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not text.strip():
            continue
        try:
            rows.append(json.loads(text))
        except json.JSONDecodeError as err:
            raise UserError(f"line {line} is not valid JSON ({err.msg})", path=path, fix=_FIX) from None
    check_predictions(rows, path)
    return rows


def _references(rows: list[dict], path: str) -> tuple[str, list[list[str]], list[list[str]] | None]:
    """(kind, primary references, true captions or None) of checked prediction rows."""
    has_v2t = [bool(r["video2text"]) for r in rows]
    has_truth = [bool(r.get("truth")) for r in rows]
    truth = [list(r["truth"]) for r in rows] if all(has_truth) else None
    if all(has_v2t):
        return "video2text", [[r["video2text"]] for r in rows], truth
    if any(has_v2t):
        line = has_v2t.index(False) + 1
        raise UserError(f"line {line} has no video2text while other lines do", path=path,
                        fix="give every line a Video2Text answer, or none of them")
    if truth is None:
        line = has_truth.index(False) + 1
        raise UserError(f"line {line} has neither video2text nor truth: nothing to score against",
                        path=path, fix="add the teacher's answers (video2text) or true captions")
    return "truth", truth, truth


# ----------------------------------------------------------------------------- permutations


def shuffle_within_subject(X: np.ndarray, subjects, seed: int) -> np.ndarray:
    """The rows of ``X`` permuted among trials of the same subject (shuffled-fMRI control).

    Each subject's trials are moved along one random cycle, so no trial keeps its own fMRI
    (a subject with a single trial cannot be shuffled and keeps it).

    Parameters
    ----------
    X:
        (n, ...) per-trial fMRI.
    subjects:
        (n,) subject label of each trial.
    """
    subjects = np.asarray(subjects)
    rng = np.random.default_rng(seed)
    source = np.arange(len(subjects))
    for s in np.unique(subjects):
        order = rng.permutation(np.flatnonzero(subjects == s))
        source[order] = np.roll(order, -1)  # trial order[k] gets the fMRI of order[k+1]
    return np.asarray(X)[source]


def permutation_indices(subjects, n_perm: int, seed: int) -> np.ndarray:
    """(n_perm, n) uniformly random permutations of trials within each subject."""
    subjects = np.asarray(subjects)
    rng = np.random.default_rng(seed)
    perms = np.tile(np.arange(len(subjects)), (n_perm, 1))
    for s in np.unique(subjects):
        idx = np.flatnonzero(subjects == s)
        perms[:, idx] = idx[np.argsort(rng.random((n_perm, len(idx))), axis=1)]
    return perms


def permutation_pvalues(tables: PairTables, subjects, n_perm: int, seed: int,
                        trials: np.ndarray | None = None,
                        keys: tuple[str, ...] = TEXT_KEYS) -> dict[str, float]:
    """p = (1 + #{shuffled ≥ real}) / (1 + n_perm) for each metric of the real pairing.

    Shuffled pairings pair trial i's hypothesis with the references of trial π(i), π a
    random permutation within each subject; ``trials`` restricts both to a subset.
    """
    idx = np.arange(tables.n) if trials is None else np.asarray(trials)
    perms = idx[permutation_indices(np.asarray(subjects)[idx], n_perm, seed)]  # (k, m)
    out = {}
    for key in keys:
        real = float(tables.statistic(key, idx, idx))
        null = tables.statistic(key, idx, perms)  # (k,)
        tol = 1e-9 * max(1.0, abs(real))  # a reordered sum of the same pairs counts as a tie
        out[key] = float((1 + np.sum(null >= real - tol)) / (1 + n_perm))
    return out


def paired_pvalues(decoder: PairTables, control: PairTables, n_perm: int, seed: int,
                   trials: np.ndarray | None = None,
                   keys: tuple[str, ...] = PAIRED_KEYS) -> dict[str, dict[str, float]]:
    """Does the decoder beat ``control`` on the same trials? A paired approximate-randomization
    test (as for MT systems): each trial's two texts, scored against that trial's references,
    are swapped with probability 1/2, and the corpus metrics recomputed.

    Returns ``{key: {"difference": decoder - control, "p": p}}`` with the one-sided
    p = (1 + #{swapped difference >= real}) / (1 + n_perm). A small p says the decoder's lead
    over this control is larger than which of the two texts each trial happened to get.
    """
    idx = np.arange(decoder.n) if trials is None else np.asarray(trials)
    swap = np.random.default_rng(seed).random((n_perm, len(idx))) < 0.5  # (k, m)
    out = {}
    for key in keys:
        a = decoder.pair_stats(key, idx, idx)  # (m, s) additive statistics of each trial
        b = control.pair_stats(key, idx, idx)
        moved = swap.astype(np.float64) @ (a - b)  # (k, s): the swaps move these from a to b
        real = float(corpus_value(key, a.sum(0)) - corpus_value(key, b.sum(0)))
        null = corpus_value(key, a.sum(0) - moved) - corpus_value(key, b.sum(0) + moved)  # (k,)
        tol = 1e-9 * max(1.0, abs(real))  # the same sums reordered count as a tie
        out[key] = {"difference": real, "p": float((1 + np.sum(null >= real - tol)) / (1 + n_perm))}
    return out


# ----------------------------------------------------------------------------- evaluate


def _score_section(tables: PairTables, subjects: np.ndarray) -> tuple[dict, dict]:
    """(per-subject METRICS, total METRICS) of the real pairing."""
    per = {s: tables.metrics(np.flatnonzero(subjects == s)) for s in sorted(set(subjects))}
    for s, m in per.items():
        m["n_trials"] = int(np.sum(subjects == s))
    total = tables.metrics()
    total["n_trials"] = tables.n
    return per, total


def _aligned(rows: list[dict], control: list[dict], name: str) -> None:
    path = f"controls/{name}.jsonl"
    check_predictions(control, path)
    if len(control) != len(rows):
        raise UserError(f"control '{name}' has {len(control)} rows but the predictions have "
                        f"{len(rows)}", path=path, fix="decode the control on the same test trials")
    for line, (a, b) in enumerate(zip(rows, control), 1):
        if (a["subject"], a["stim"], a["onset"]) != (b["subject"], b["stim"], b["onset"]):
            raise UserError(f"line {line} is trial {b['subject']} {b['stim']} @ {b['onset']}, but the "
                            f"predictions have {a['subject']} {a['stim']} @ {a['onset']}", path=path,
                            fix="write controls in the same trial order as predictions.jsonl")


def _against(refs: list[list[str]], predictions: list[dict], controls: dict[str, list[dict]],
             scorer: TextScorer, cfg: EvaluationConfig, subjects: np.ndarray) -> dict:
    """subjects / total / controls / p_values of the decoder and controls against ``refs``."""
    t0 = time.perf_counter()
    tables = scorer.pairwise([r["fmri2text"] for r in predictions], refs)
    per, total = _score_section(tables, subjects)
    out: dict = {"subjects": per, "total": total, "controls": {}, "controls_subjects": {}}
    control_tables = {}
    for name, rows in controls.items():
        control_tables[name] = scorer.pairwise([r["fmri2text"] for r in rows], refs)
        c_per, c_total = _score_section(control_tables[name], subjects)
        out["controls"][name] = c_total
        out["controls_subjects"][name] = c_per
    t_scored = time.perf_counter()
    out["paired"] = {
        "n_permutations": cfg.n_permutations, "seed": cfg.seed,
        "scheme": "decoder against each control on the same trials: each trial's two texts "
                  "swapped with probability 1/2; p = (1 + #{swapped difference >= real}) / "
                  "(1 + n_perm), one-sided (the decoder ahead)",
        "controls": {name: {
            "subjects": {s: paired_pvalues(tables, c_tables, cfg.n_permutations, cfg.seed,
                                           trials=np.flatnonzero(subjects == s))
                         for s in sorted(set(subjects))},
            "total": paired_pvalues(tables, c_tables, cfg.n_permutations, cfg.seed)}
            for name, c_tables in control_tables.items()}}
    out["paired"]["seconds"] = round(time.perf_counter() - t_scored, 3)
    t1 = time.perf_counter()
    out["p_values"] = permutation_pvalues(tables, subjects, cfg.n_permutations, cfg.seed)
    out["permutation"] = {
        "n_permutations": cfg.n_permutations, "seed": cfg.seed,
        "scheme": "hypothesis i scored against the references of trial pi(i), "
                  "pi uniform within each subject; p = (1 + #{perm >= real}) / (1 + n_perm)",
        "subjects": {s: permutation_pvalues(tables, subjects, cfg.n_permutations, cfg.seed,
                                            trials=np.flatnonzero(subjects == s))
                     for s in sorted(set(subjects))},
        "seconds": round(time.perf_counter() - t1, 3),
    }
    out["permutation"]["scoring_seconds"] = round(t_scored - t0, 3)
    return out


def _retrieval_sets(retrieval: dict) -> dict[str, tuple]:
    """name → (pred, candidates, true_index) of the decoder and of each peer saved beside it
    (``<peer>_pred`` with ``<peer>_candidates``, or the decoder's candidates)."""
    true_index = retrieval.get("true_index")
    true_index = np.arange(len(retrieval["pred"])) if true_index is None else np.asarray(true_index)
    out = {"fmri2text": (retrieval["pred"], retrieval["candidates"], true_index)}
    for key in retrieval:
        if key.endswith("_pred"):
            name = key[:-len("_pred")]
            out[name] = (retrieval[key], retrieval.get(f"{name}_candidates", retrieval["candidates"]),
                         true_index)
    return out


def identification(pred: np.ndarray, candidates: np.ndarray, true_index: np.ndarray,
                   subjects: np.ndarray) -> tuple[dict, dict]:
    """(total, per-subject) top-1 / top-5 / 2-way identification with chance levels.

    Total: among all candidates; a subject: among the clips that subject's test trials
    showed (its own test clips), so a subject's chance level is that of its own set.
    """
    pred, cand, true_index = np.asarray(pred), np.asarray(candidates), np.asarray(true_index)
    total = retrieval_metrics(pred, cand, true_index)
    per = {}
    for s in sorted(set(subjects)):
        rows = np.flatnonzero(subjects == s)
        own, local = np.unique(true_index[rows], return_inverse=True)
        per[s] = retrieval_metrics(pred[rows], cand[own], local.reshape(-1))
    return total, per


def output_health(rows: list[dict], prior: str | None) -> dict:
    """How varied a decoder's texts are: per subject and in total, the fraction of distinct
    outputs and the share equal to the LLM's prompt-only answer ``prior`` (None: not known).

    A decoder that says the same thing for every trial, or mostly its prior, scores what
    its references have in common, not what the fMRI carries.
    """
    from fmri2text.health import same_text_key

    def stats(texts: list[str]) -> dict:
        n = len(texts)
        norm = [same_text_key(t) for t in texts]
        out = {"n": n, "distinct": len(set(norm)), "distinct_fraction": len(set(norm)) / max(n, 1)}
        if prior is not None:
            p = same_text_key(prior)
            out["prior_share"] = sum(t == p for t in norm) / max(n, 1)
        return out

    by_subject: dict[str, list[str]] = {}
    for r in rows:
        by_subject.setdefault(str(r["subject"]), []).append(str(r["fmri2text"]))
    return {"total": stats([str(r["fmri2text"]) for r in rows]),
            "subjects": {s: stats(t) for s, t in sorted(by_subject.items())}}


def evaluate(predictions: list[dict], controls: dict[str, list[dict]], scorer: TextScorer,
             cfg: EvaluationConfig, retrieval: dict | None = None) -> dict:
    """Score predictions and controls into the metrics.json structure of DESIGN §5.

    Parameters
    ----------
    predictions:
        predictions.jsonl rows (subject, run, onset, stim, instruction, video2text,
        fmri2text, truth) of the decoder on the held-out test trials.
    controls:
        name → rows of the same trials decoded by a control ('shuffled', 'prompt_only',
        'ridge'); an absent control is omitted from the output. Controls are scored against
        the predictions' references.
    retrieval:
        Optional ``{"pred": (n, d), "candidates": (m, d), "true_index": (n,) (optional)}``:
        fMRI-predicted and candidate clip embeddings, row-aligned with ``predictions``;
        adds top1/top5/twoway (×100) and their chance levels to subjects (among each
        subject's own test clips) and total (among all). Peers' predictions
        ``<control>_pred`` (with ``<control>_candidates`` when they live in another space)
        add the same to that control's rows.
    """
    check_predictions(predictions, "predictions.jsonl")
    for name, rows in controls.items():
        _aligned(predictions, rows, name)
    kind, refs, truth = _references(predictions, "predictions.jsonl")
    subjects = np.array([str(r["subject"]) for r in predictions])
    prior = str(controls["prompt_only"][0]["fmri2text"]) if controls.get("prompt_only") else None

    primary = _against(refs, predictions, controls, scorer, cfg, subjects)
    if truth is None:
        vs_truth: dict = {}
    elif kind == "truth":
        vs_truth = {k: primary[k] for k in SECTION_KEYS}
    else:
        full = _against(truth, predictions, controls, scorer, cfg, subjects)
        vs_truth = {k: full[k] for k in SECTION_KEYS}

    if retrieval is not None:
        if len(retrieval["pred"]) != len(predictions):
            raise ValueError(f"retrieval has {len(retrieval['pred'])} predicted embeddings for "
                             f"{len(predictions)} predictions")
        for name, (pred, cand, true_index) in _retrieval_sets(retrieval).items():
            total, per = identification(pred, cand, true_index, subjects)
            if name == "fmri2text":
                total_m, per_m = primary["total"], primary["subjects"]
            elif name in primary["controls"]:
                total_m, per_m = primary["controls"][name], primary["controls_subjects"][name]
            else:
                continue
            total_m.update(total)
            for s, m in per.items():
                per_m[s].update(m)

    return {
        "scorer": scorer.identity(),
        "reference": kind,
        "subjects": primary["subjects"],
        "total": primary["total"],
        "controls": primary["controls"],
        "controls_subjects": primary["controls_subjects"],
        "p_values": primary["p_values"],
        "permutation": primary["permutation"],
        "paired": primary["paired"],
        "n_test_trials": len(predictions),
        "vs_truth": vs_truth,
        "output_health": {name: output_health(rows, prior) for name, rows in
                          [("fmri2text", predictions), *sorted(controls.items())]
                          if name != "prompt_only"},
    }


# ----------------------------------------------------------------------------- table


def format_table(metrics: dict, section: str = "primary") -> str:
    """The paper's table (Tables 1–2): a row per subject and Total, control rows beside each.

    Columns: BERTScore-F1 | BLEU-1 | BLEU-2 | ROUGE-L F | P | R (all %), plus top-1 and
    2-way identification when retrieval was scored, and the permutation p-values of
    BERTScore-F1 and BLEU-1: within-subject on each subject's row, pooled on Total; on a
    control's row, the paired test's p that the decoder beats that control
    (:func:`paired_pvalues`).
    ``section`` 'vs_truth' tabulates the scores against the true captions.
    """
    from rich.console import Console
    from rich.table import Table

    src = metrics if section == "primary" else metrics.get("vs_truth") or {}
    ref = metrics.get("reference", "?") if section == "primary" else "truth"
    cols = [("BERTScore", "bertscore_f1"), ("BLEU-1", "bleu1"), ("BLEU-2", "bleu2"),
            ("ROUGE-L F", "rougeL_f"), ("P", "rougeL_p"), ("R", "rougeL_r")]
    total = src.get("total", {})
    if "top1" in total:
        cols += [("top-1", "top1"), ("2-way", "twoway")]
    p_cols = [("p F1", "bertscore_f1"), ("p BLEU-1", "bleu1")]
    table = Table(title=f"fMRI2Text vs {ref} (%, {metrics.get('n_test_trials', '?')} test trials)")
    table.add_column("Subject")
    for title, _ in cols + p_cols:
        table.add_column(title, justify="right")

    def add(label: str, m: dict, p: dict | None = None, style: str | None = None) -> None:
        p = p or {}
        table.add_row(label, *[f"{m[k]:.2f}" if k in m else "–" for _, k in cols],
                      *[f"{p[k]:.4f}" if k in p else "" for _, k in p_cols], style=style)

    ctl_sub = src.get("controls_subjects", {})
    p_sub = src.get("permutation", {}).get("subjects", {})
    paired = src.get("paired", {}).get("controls", {})

    def beats(name: str, subject: str | None) -> dict:  # paired p of the decoder vs a control
        part = paired.get(name, {})
        got = part.get("total", {}) if subject is None else part.get("subjects", {}).get(subject, {})
        return {k: v["p"] for k, v in got.items()}

    for s, m in src.get("subjects", {}).items():
        add(s, m, p_sub.get(s))
        for name in ctl_sub:
            add(f"  {name}", ctl_sub[name].get(s, {}), beats(name, s), style="dim")
    p = src.get("p_values", {})
    add("Total", total, p, style="bold")
    for name, m in src.get("controls", {}).items():
        add(f"  {name}", m, beats(name, None), style="dim")
    if p:
        table.caption = ("permutation p (shuffled pairings; subject rows within subject, Total "
                         "pooled): " + ", ".join(f"{k} {v:.4g}" for k, v in p.items()
                                                 if k in ("bertscore_f1", "bleu1", "rougeL_f")))
        if paired:
            table.caption += ("; on a control's row, paired p that the decoder beats it (each "
                              "trial's two texts swapped at random)")
    buf = io.StringIO()
    Console(file=buf, width=140, force_terminal=False, color_system=None).print(table)
    return buf.getvalue()
