"""Health of a run's targets: is the teacher saying anything clip-specific?

A teacher that does not fit a dataset's clips (uniform or unreadable video, too few teacher
steps, a checkpoint for other footage) answers every clip the same way and gives every clip
nearly the same video tokens. Everything downstream then trains on targets without
information, and identification among identical candidates is not a result. These checks run
after ``annotate`` and stop ``fmri2text run`` (exit 2) below the thresholds unless
``pipeline.allow_degenerate_teacher`` is set; the numbers go to ``steps.json``,
``RUN/teacher_health.json``, ``metrics.json`` and a banner in the report either way.

Measures (and the defaults' basis, the demo's healthy teacher in brackets):

- ``distinct_answer_fraction``: distinct answers / clips, training and test clips apart
  [0.55 and 0.69]. Fails below ``pipeline.min_distinct_answer_fraction`` (0.05), or with
  a single distinct answer among two or more clips.
- ``token_cosine``: mean pairwise cosine of the clips' mean video tokens [0.91]. Fails
  above ``pipeline.max_token_cosine`` (0.995); identical tokens give 1.
- ``teacher_heldout``: the fitted teacher's BERTScore-F1 on its held-out web clips against
  its answer without video [67.6 vs 25.0]; fails when the gain is below
  ``pipeline.min_teacher_gain`` (5 points). Absent for a given checkpoint.
"""

from __future__ import annotations

import numpy as np

HEALTH_FILE = "teacher_health.json"


def same_text_key(text: str) -> str:
    """What makes two answers the same answer here: case and runs of whitespace ignored."""
    return " ".join(text.split()).lower()


def answer_token_stats(answers: list[str], tokens) -> dict:
    """Distinct answers and the spread of the clips' mean video tokens (N, L, d)."""
    n = len(answers)
    distinct = len({same_text_key(a) for a in answers})
    x = np.asarray(tokens, dtype=np.float64).mean(axis=1)  # (N, d)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    s = x.sum(axis=0)
    cosine = float((s @ s - n) / (n * (n - 1))) if n > 1 else 1.0  # off-diagonal mean
    return {"n_clips": n, "distinct_answers": distinct,
            "distinct_answer_fraction": distinct / max(n, 1), "token_cosine": cosine}


def teacher_health(parts: dict[str, dict], teacher_eval: dict | None, cfg) -> dict:
    """Verdict over ``parts`` (name → :func:`answer_token_stats`) and the teacher's own
    held-out scores (``teacher.json``'s ``eval`` or None); ``cfg`` the pipeline config."""
    problems = []
    for name, p in parts.items():
        few = p["distinct_answer_fraction"] < cfg.min_distinct_answer_fraction
        if p["n_clips"] >= 2 and (p["distinct_answers"] < 2 or few):
            why = (f"fraction {p['distinct_answer_fraction']:.3f} < "
                   f"{cfg.min_distinct_answer_fraction}") if few else "one answer for all"
            problems.append(f"{p['distinct_answers']} distinct answer(s) for {p['n_clips']} "
                            f"{name} clips ({why})")
        if p["n_clips"] >= 2 and p["token_cosine"] > cfg.max_token_cosine:
            problems.append(f"{name} clips' video tokens are nearly identical (mean pairwise "
                            f"cosine {p['token_cosine']:.4f} > {cfg.max_token_cosine})")
    heldout = None
    if teacher_eval and "video2text" in teacher_eval and "no_video" in teacher_eval:
        f1, prior = (float(teacher_eval[k]["bertscore_f1"]) for k in ("video2text", "no_video"))
        heldout = {"bertscore_f1": f1, "no_video_bertscore_f1": prior, "gain": f1 - prior}
        if f1 - prior < cfg.min_teacher_gain:
            problems.append(f"the teacher's held-out BERTScore-F1 {f1:.1f} is only "
                            f"{f1 - prior:.1f} above its answer without video ({prior:.1f})")
    return {**parts, "teacher_heldout": heldout, "degenerate": bool(problems),
            "problems": problems, "overridden": bool(problems) and cfg.allow_degenerate_teacher,
            "thresholds": {"min_distinct_answer_fraction": cfg.min_distinct_answer_fraction,
                           "max_token_cosine": cfg.max_token_cosine,
                           "min_teacher_gain": cfg.min_teacher_gain}}


FIX = ("use a teacher that fits these clips: a pretrained checkpoint "
       "(pipeline.teacher_checkpoint=PATH/teacher.safetensors) or more teacher steps "
       "(teacher.steps); check that the clips play and differ (stimuli/); or, knowingly, "
       "set pipeline.allow_degenerate_teacher=true")
