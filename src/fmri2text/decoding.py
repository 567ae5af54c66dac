"""``decode`` and ``evaluate`` steps: held-out fMRI → text through the Stage II student and
the frozen LLM, with the controls, then scoring into ``metrics.json`` (DESIGN §5).

decode reads ``RUN/stage2/student.safetensors``, the held-out subjects' *test* windows,
``RUN/eval_annotations`` (the teacher's Video2Text and video tokens of the test clips,
evaluation only) and ``RUN/annotations`` (training clips' answers, for the ridge baseline);
it writes::

    RUN/predictions.jsonl          subject run onset stim instruction video2text fmri2text truth
    RUN/controls/shuffled.jsonl    same student, fMRI permuted within subject
    RUN/controls/prompt_only.jsonl no fMRI tokens: the LLM's prior
    RUN/controls/ridge.jsonl       ridge fMRI → sentence embedding, nearest training answer
    RUN/controls/ridge_tokens.jsonl  ridge fMRI → the teacher's video tokens, through the frozen
                                   LLM with the decoder's instruction and generation settings
                                   (MBR without the semantic head: tokens alone)
    RUN/retrieval.npz              pooled Z of each trial, pooled X of each test clip; the
                                   peers' predictions and candidates (identification)
    RUN/brain_map.nii.gz           gradient saliency of the student, back in the volume
    RUN/decode.json                what was decoded with (student hash, timings)
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fmri2text.config import Config
from fmri2text.errors import UserError
from fmri2text.io import ensure_output_dir, file_hash, write_bytes, write_json, write_jsonl
from fmri2text.models.student import deep_gain_text, deep_path_share
from fmri2text.steps import EVAL_ANNOTATIONS, teacher_checkpoint

Log = Callable[[str], None]

# ----------------------------------------------------------------------------- decode


def truths(trials, idx: np.ndarray, cfg) -> tuple[list[list[str] | None], str]:
    """The true texts of trial-table rows ``idx`` and where they come from.

    A trial's captions where it has some; otherwise, with
    ``evaluation.truth_without_captions='class'``, ``evaluation.class_truth_template`` over
    its class name (HAD has no captions: its text is the class). Source: 'captions',
    'class names (template ...)', a mix of both, or 'none'.
    """
    out, kinds = [], set()
    template = cfg.class_truth_template
    for i in idx:
        caps = list(trials["captions"].iat[i])
        name = str(trials["class_name"].iat[i]).strip() if "class_name" in trials else ""
        if caps:
            out.append(caps)
            kinds.add("captions")
        elif cfg.truth_without_captions == "class" and name:
            try:
                out.append([template.format(class_name=name)])
            except (KeyError, IndexError, ValueError) as err:
                raise UserError(f"evaluation.class_truth_template={template!r} cannot be filled "
                                f"({type(err).__name__}: {err})",
                                fix="use only {class_name} in it, e.g. 'A video of {class_name}.'") from None
            kinds.add(f"class names (template {template!r})")
        else:
            out.append(None)
    return out, " + ".join(sorted(kinds)) or "none"


def _rows(trials, idx: np.ndarray, instruction: str, video2text: list[str | None],
          texts: list[str], truth: list[list[str] | None]) -> list[dict]:
    """predictions.jsonl rows of trial-table rows ``idx``."""
    return [{"subject": f"sub-{trials['subject'].iat[i]}", "run": int(trials["run"].iat[i]),
             "onset": float(trials["onset"].iat[i]), "stim": str(trials["stim_file"].iat[i]),
             "instruction": instruction, "video2text": v, "fmri2text": t, "truth": g}
            for i, v, t, g in zip(idx, video2text, texts, truth)]


def _eval_answers(run: Path, digest: str, clips: list[str], instruction: str
                  ) -> tuple[list[str | None], np.ndarray, list[str]]:
    """Video2Text per trial clip (None where the teacher did not answer this instruction),
    pooled X (K, d) of the distinct test clips, and those clips (sorted)."""
    from fmri2text.data.datasets import ClipTargets

    folder = Path(run) / EVAL_ANNOTATIONS
    targets = ClipTargets.from_store(folder, digest)
    missing = targets.missing(clips)
    if missing:
        raise UserError(f"{len(missing)} test clip(s) have no evaluation annotation, e.g. "
                        f"{missing[:2]}", path=folder, fix="run fmri2text annotate on this run")
    index = json.loads((folder / f"annotations-{digest}.json").read_text(encoding="utf-8"))["rows"]
    answers = {(r["clip"], r["instruction"]): r["answer"] for r in index}
    v2t = [answers.get((c, instruction)) for c in clips]
    if any(v is None for v in v2t):
        v2t = [None] * len(clips)  # no teacher answer for this instruction: score vs truth
    distinct = sorted(set(clips))
    pooled = torch.nn.functional.normalize(targets.tokens_of(distinct).mean(dim=1), dim=-1)
    return v2t, pooled.numpy(), distinct


def _distinct_answers(distinct: list[str], clips, references: list[str]) -> list[str]:
    """The reference text of each distinct test clip (the ridge peer's identification
    candidates, in its sentence space)."""
    first = dict(zip(clips, references))
    return [first[c] for c in distinct]


def _saliency(decoder, data, positions: np.ndarray, batch: int) -> np.ndarray:
    """Mean |∂‖Z‖²/∂fMRI| over trials and time, per feature (F,): where the decoder looks."""
    total = None
    for s in range(0, len(positions), batch):
        x = data.fmri(positions[s:s + batch]).requires_grad_(True)  # (B, T, X', Y', Z')
        decoder.tokens(x).float().pow(2).sum().backward()
        g = x.grad.abs().sum(dim=(0, 1))  # (X', Y', Z')
        total = g if total is None else total + g
    decoder.student.zero_grad(set_to_none=True)
    flat = total.flatten() if data.crop is None else total.flatten()[data.crop.index]
    return (flat / max(len(positions), 1)).numpy()


def _deep_path(decoder, data, z: torch.Tensor, offsets: torch.Tensor | None, batch: int
               ) -> dict | None:
    """What the deep path adds to the test trials' tokens ``z`` (:func:`fmri2text.models.
    student.deep_path_share`), or None without a linear path or with the deep path off."""
    student = decoder.student
    if student.linear is None or decoder.deep_gain == 0:
        return None
    with torch.no_grad():
        device = student.linear.index.device
        lin = torch.cat([student.linear(data.fmri(np.arange(s, min(s + batch, len(data))))
                                        .to(device)).float().cpu()
                         for s in range(0, len(data), batch)])  # (n, L, d)
    return deep_path_share(z, student.cross_fitted(lin, offsets))


def choose_decoding(decoder, windows, run: Path, cfg: Config, log: Log = print) -> dict | None:
    """Choose how the test trials are decoded, on the training subjects' validation trials.

    The validation trials (:func:`~fmri2text.data.splits.validation_rows`, as Stage II's)
    are decoded through ``decoder`` with their tokens and semantic-head embeddings
    cross-fitted as a held-out subject's would be (Stage I's offsets): once with one answer
    per trial, and once with ``pipeline.decode_samples`` candidates (drawn once), chosen by
    MBR with each of ``pipeline.decode_choose_betas`` × ``decode_choose_reranks`` (rerank
    weights only where the student has a semantic head) — all of it for each of
    ``decode_choose_deep_gains``, the weight of the student's deep path in its tokens (only
    where it has a linear path; 0: the linear path alone). Each setting's answers are scored
    against the teacher's answers of those clips; the best mean of BERTScore-F1 and BLEU-1
    is set in ``decoder.generation``. Returns every setting's scores and the choice, or None
    when off (``pipeline.decode_choose=false``, ``decode_samples`` < 2, fewer than 2
    validation trials).
    """
    from fmri2text.data.datasets import split_rows
    from fmri2text.data.splits import validation_rows
    from fmri2text.evaluation.metrics import TextScorer
    from fmri2text.models.generation import choose_answers_grid, generate, mbr_candidates
    from fmri2text.training.stage1 import CROSSFIT_FILE, load_crossfit, load_targets

    p = cfg.pipeline
    trials = windows.trials
    _, val = validation_rows(trials, split_rows(trials, "train"), cfg.split.val_fraction,
                             cfg.split.seed)
    if not p.decode_choose or p.decode_samples < 2 or len(val) < 2:
        return None
    clips = trials["stim_file"].astype(str).to_numpy()[val]
    instructions, answers = load_targets(run, cfg.stage1.annotations).text_of(clips)
    crossfit = Path(run) / "stage1" / CROSSFIT_FILE
    offsets = load_crossfit(crossfit, val)  # (n_val, L, d): the linear path as if not fitted on
    semantic = decoder.semantic(windows.data, val, offsets=load_crossfit(crossfit, val, "semantic"))
    kw = decoder.generation_kwargs()
    model, tokenizer = decoder.llm()
    reranks = p.decode_choose_reranks if semantic is not None else [0.0]
    deep_gains = p.decode_choose_deep_gains if decoder.student.linear is not None else [1.0]
    settings = {}  # (deep gain, samples, beta, rerank) -> the validation trials' answers
    for deep in deep_gains:
        decoder.generation["deep_gain"] = deep
        z = decoder.student.cross_fitted(decoder.fmri_tokens(windows.data, val), offsets)
        cands = mbr_candidates(model, tokenizer, z, instructions, kw["max_new_tokens"],
                               greedy=kw["greedy"], seed=kw["seed"], temperature=kw["temperature"],
                               top_p=kw["top_p"], batch_size=kw["batch_size"],
                               samples=p.decode_samples, system=kw["system"])
        # one answer per trial: the greedy answer is each prompt's first candidate
        settings[(deep, 0, kw["mbr_beta"], 0.0)] = [next(iter(c)) for c in cands] \
            if kw["greedy"] else generate(model, tokenizer, z, instructions, **{**kw, "samples": 0})
        grid = choose_answers_grid(cands, p.decode_choose_betas, reranks, semantic,
                                   decoder.embed_answers)
        settings.update({(deep, p.decode_samples, *key): texts for key, texts in grid.items()})
    scorer = TextScorer(cfg.evaluation)
    scores = {}
    for key, texts in settings.items():
        s = scorer.score(texts, answers)
        scores[key] = {"bertscore_f1": s["bertscore_f1"], "bleu1": s["bleu1"],
                       "mean": (s["bertscore_f1"] + s["bleu1"]) / 2}
    best = max(scores, key=lambda k: scores[k]["mean"])  # ties: the first (one answer)
    decoder.generation.update(deep_gain=best[0], samples=best[1], mbr_beta=best[2], rerank=best[3])
    name = lambda k: ("one answer" if k[1] == 0 else f"MBR-{k[1]} beta {k[2]:g} rerank {k[3]:g}") \
        + ("" if len(deep_gains) == 1 else f", deep gain {k[0]:g}")  # noqa: E731
    log(f"decode: chose {name(best)} on {len(val)} validation trials (mean of BERTScore-F1 "
        "and BLEU-1: " + ", ".join(f"{name(k)} {v['mean']:.2f}" for k, v in scores.items()) + ")")
    return {"n_validation_trials": len(val), "criterion": "mean of bertscore_f1 and bleu1 "
            "against the teacher's answers",
            "chosen": {"samples": best[1], "mbr_beta": best[2], "rerank": best[3],
                       "deep_gain": best[0]},
            "settings": [{"samples": k[1], "mbr_beta": k[2], "rerank": k[3], "deep_gain": k[0], **v}
                         for k, v in scores.items()]}


def run_decode(bids: Path, run: Path, cfg: Config, instruction: str | None = None,
               log: Log = print, windows=None) -> dict:
    """Decode the held-out subjects' test trials; write predictions, controls and extras.

    The student forward and generation go through :class:`fmri2text.api.Decoder`, the same
    code as ``Decoder.from_pretrained(RUN/model).decode(...)``. ``windows``: the dataset's
    ``load_windows(bids, cfg)`` when the caller has it already.
    """
    from fmri2text.api import Decoder
    from fmri2text.data.datasets import TrialWindows, load_windows, split_rows
    from fmri2text.evaluation.baselines import RidgeBaseline
    from fmri2text.evaluation.evaluate import shuffle_within_subject
    from fmri2text.training.stage1 import load_targets
    from fmri2text.training.stage2 import check_student

    run = Path(run)
    student_path = check_student(run, cfg)
    _, digest = teacher_checkpoint(run, cfg)
    instruction = instruction or cfg.evaluation.instruction
    if not instruction.strip():
        raise UserError("the instruction is empty", fix="pass --instruction 'Describe the video.'")
    p = cfg.pipeline
    timings: dict[str, float] = {}
    t = time.perf_counter()
    windows = windows if windows is not None else load_windows(bids, cfg)
    trials = windows.trials
    test_idx = split_rows(trials, "test")
    test = TrialWindows(windows, test_idx)
    subjects = test.subjects
    video2text, cand, distinct = _eval_answers(run, digest, list(test.clips), instruction)
    decoder = Decoder.from_run(run, cfg, feature_mask=windows.feature_mask, grid=windows.grid)
    timings["load"] = time.perf_counter() - t
    t = time.perf_counter()
    choice = choose_decoding(decoder, windows, run, cfg, log)
    timings["choose"] = time.perf_counter() - t

    t = time.perf_counter()
    pos = np.arange(len(test))
    adapt_idx = split_rows(trials, "adapt")  # each held-out subject aligned by its unlabelled
    adapt_subjects = trials["subject"].astype(str).to_numpy()[adapt_idx]  # adapt trials, or None
    tok_off, sem_off = decoder.alignment(windows.data, test_idx, subjects, adapt_idx, adapt_subjects)
    z = decoder.fmri_tokens(windows.data, test_idx, offsets=tok_off)  # (n, L, d)
    saliency = _saliency(decoder, test, pos, p.decode_batch_size)
    deep_path = _deep_path(decoder, test, z, tok_off, p.decode_batch_size)
    instrs = [instruction] * len(test)
    log(f"decode: {len(test)} test trials of {len(set(subjects))} held-out subject(s)")
    semantic = decoder.semantic(windows.data, test_idx, offsets=sem_off)  # (n, d_s) or None
    decoded = decoder.generate(z, instrs, semantic=semantic)
    timings["decode"] = time.perf_counter() - t
    t = time.perf_counter()
    # the shuffled control: each trial gets another trial's fMRI (tokens and semantic head).
    # A trial's answer depends on its own inputs alone (greedy, or MBR with its sampling seeded
    # by them: generation.prompt_seeds), so decoding the permuted inputs again would give the
    # decoder's answers permuted: they are taken as such, one LLM pass fewer
    source = shuffle_within_subject(np.arange(len(test)), subjects, cfg.evaluation.seed)
    shuffled = [decoded[j] for j in source]
    prior = decoder.generate(None, instrs[:1])[0]
    timings["controls_llm"] = time.perf_counter() - t

    t = time.perf_counter()
    train_idx = split_rows(trials, "train")
    train_targets = load_targets(run, cfg.stage1.annotations)
    train_clips = trials["stim_file"].astype(str).to_numpy()[train_idx]
    train_texts = train_targets.text_of(train_clips)[1]
    X = windows.data.mean(axis=1)  # (n_trials, F): the window's mean response
    groups = trials["subject"].to_numpy()[train_idx]
    ridge = RidgeBaseline(cfg.baseline)
    ridge.fit(X[train_idx], train_texts, groups=groups)
    ridge_texts = ridge.decode(X[test_idx])
    ridge_pred = ridge.predict_embeddings(X[test_idx])  # (n, 384) sentence space
    truth, truth_source = truths(trials, test_idx, cfg.evaluation)
    references = [v if v is not None else (g or [""])[0]
                  for v, g in zip(video2text, truth)]  # what the texts are scored against
    ridge_cand = ridge.embed(_distinct_answers(distinct, test.clips, references))
    timings["ridge"] = time.perf_counter() - t
    # the linear peer of the student: the same features onto the teacher's tokens (the
    # Stage I target), decoded by the frozen LLM exactly as the student's tokens are
    t = time.perf_counter()
    x_train = train_targets.tokens_of(train_clips)  # (n_train, L, d)
    tok_ridge = RidgeBaseline(cfg.baseline).fit(X[train_idx], train_texts, groups=groups,
                                                Y=x_train.reshape(len(train_idx), -1).numpy())
    z_lin = torch.from_numpy(tok_ridge.predict_embeddings(X[test_idx]).astype(np.float32)
                             ).view(len(test), *x_train.shape[1:])  # (n, L, d)
    ridge_tokens = decoder.generate(z_lin, instrs, rerank=0.0)  # tokens alone: no semantic head
    timings["ridge_tokens"] = time.perf_counter() - t

    row = lambda texts: _rows(trials, test_idx, instruction, video2text, texts, truth)  # noqa: E731
    predictions = row(decoded)
    controls = {"shuffled": row(shuffled), "prompt_only": row([prior] * len(test)),
                "ridge": row(ridge_texts), "ridge_tokens": row(ridge_tokens)}
    write_jsonl(run / "predictions.jsonl", predictions)
    ensure_output_dir(run / "controls", what="controls folder")
    for name, rows in controls.items():
        write_jsonl(run / "controls" / f"{name}.jsonl", rows)
    pooled = torch.nn.functional.normalize(z.mean(dim=1), dim=-1).numpy()  # (n, d)
    true_index = np.array([distinct.index(c) for c in test.clips])
    buf = io.BytesIO()
    np.savez(buf, pred=pooled, candidates=cand, true_index=true_index,
             ridge_tokens_pred=z_lin.mean(dim=1).numpy(), ridge_pred=ridge_pred,
             ridge_candidates=ridge_cand)
    write_bytes(run / "retrieval.npz", buf.getvalue())
    _write_saliency(run, windows, trials, saliency)
    record = {"decoder": "fmri2text", "student": str(student_path),
              "student_hash": file_hash(student_path), "teacher_hash": digest,
              "instruction": instruction, "n_test_trials": len(test),
              "reference": "video2text" if video2text[0] is not None else "truth",
              "truth_source": truth_source,
              "prompt_only_answer": prior, "generation": decoder.generation_kwargs(),
              "deep_gain": decoder.deep_gain,
              "deep_path": deep_path,
              "subject_alignment": None if tok_off is None else {
                  "method": "coral", "shrinkage": cfg.encoder.align_shrinkage,
                  "unlabelled_trials": {str(k): int(v) for k, v in zip(
                      *np.unique(adapt_subjects, return_counts=True)) if k in set(subjects)}},
              "decoding_choice": choice,
              "mask_sha256": decoder.preprocessing.mask_sha256(),
              "timings_s": {k: round(v, 2) for k, v in timings.items()},
              "pipeline": dataclasses.asdict(p)}
    write_json(run / "decode.json", record)
    return record


def _write_saliency(run: Path, windows, trials, values: np.ndarray) -> None:
    """``RUN/brain_map.nii.gz`` from per-feature values (volume data only)."""
    if windows.grid is None:
        return
    import nibabel as nib

    affine = nib.load(str(trials["bold_path"].iat[0])).affine
    mask = windows.feature_mask.reshape(windows.grid).astype(np.uint8)
    write_brain_map(run / "brain_map.nii.gz", values, nib.Nifti1Image(mask, affine))


def write_brain_map(path: Path, values: np.ndarray, mask_img) -> None:
    """Write per-feature ``values`` (n_features,) back into the volume of ``mask_img``."""
    import gzip

    from nilearn.masking import unmask

    img = unmask(values.astype(np.float32), mask_img)
    write_bytes(path, gzip.compress(img.to_bytes(), mtime=0))


# ----------------------------------------------------------------------------- evaluate


def read_run_outputs(run: Path) -> tuple[list[dict], dict[str, list[dict]], dict | None]:
    """Checked predictions, controls and retrieval arrays of a run (UserError naming a bad file)."""
    from fmri2text.evaluation.evaluate import read_predictions

    predictions = read_predictions(Path(run) / "predictions.jsonl")
    controls = {}
    folder = Path(run) / "controls"
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        rows = read_predictions(path)
        if len(rows) != len(predictions):
            raise UserError(f"{len(rows)} control rows for {len(predictions)} predictions",
                            path=path, fix="rerun fmri2text decode, which writes both")
        controls[path.stem] = rows
    retrieval = None
    rpath = Path(run) / "retrieval.npz"
    if rpath.is_file():
        try:
            with np.load(rpath, allow_pickle=False) as f:
                retrieval = {k: f[k] for k in f.files}
            if not {"pred", "candidates", "true_index"} <= set(retrieval):
                raise KeyError("pred, candidates and true_index")
        except (OSError, ValueError, KeyError) as err:
            raise UserError(f"cannot read retrieval embeddings ({err})", path=rpath,
                            fix="delete it and rerun fmri2text decode") from None
        if len(retrieval["pred"]) != len(predictions):
            retrieval = None  # written for another predictions file: not scored
    return predictions, controls, retrieval


def decoding_summary(record: dict) -> dict:
    """How the test trials were decoded, from ``decode.json``: the generation settings that
    matter and, when it was chosen on validation trials, on how many and among what."""
    g = record.get("generation") or {}
    samples = int(g.get("samples", 0) or 0)
    text = ("greedy" if g.get("greedy", True) else "sampled") if samples < 2 else (
        f"MBR over {samples} samples (beta {g.get('mbr_beta', 1.0):g}, semantic rerank "
        f"{g.get('rerank', 0.0):g})")
    deep = float(record.get("deep_gain", 1.0))
    text += f", {deep_gain_text(deep)}" if deep != 1 else ""
    align = record.get("subject_alignment")
    if align:
        text += (", each held-out subject aligned to the training subjects by its unlabelled adapt "
                 f"trials (CORAL, {sum(align['unlabelled_trials'].values())} trials)")
    choice = record.get("decoding_choice")
    if choice:
        text += (f", chosen on {choice['n_validation_trials']} validation trials of the training "
                 f"subjects among {len(choice['settings'])} settings")
    share = record.get("deep_path")
    if share and share.get("tokens_rms") and share.get("trial_ratio") is not None:
        text += (f"; the deep path adds a shift shared by all trials "
                 f"({100 * share['deep_shared_rms'] / share['tokens_rms']:.0f} % of the RMS of the "
                 f"tokens) and a trial-to-trial part {100 * share['trial_ratio']:.0f} % as large "
                 "as that of the linear path")
    return {"text": text, "samples": samples, "mbr_beta": g.get("mbr_beta"),
            "rerank": g.get("rerank"), "deep_gain": deep, "chosen_on_validation": bool(choice)}


def run_evaluate(run: Path, cfg: Config, log: Log = print) -> dict:
    """Score predictions + controls (+ retrieval) into ``RUN/metrics.json``; return it."""
    from fmri2text.evaluation.evaluate import evaluate
    from fmri2text.evaluation.metrics import TextScorer

    run = Path(run)
    predictions, controls, retrieval = read_run_outputs(run)
    t = time.perf_counter()
    metrics = evaluate(predictions, controls, TextScorer(cfg.evaluation), cfg.evaluation,
                       retrieval=retrieval)
    record = run / "decode.json"
    try:
        info = json.loads(record.read_text(encoding="utf-8"))
        metrics["decoder"] = info.get("decoder", "fmri2text")
        metrics["truth_source"] = info.get("truth_source")
        metrics["decoding"] = decoding_summary(info)
    except (OSError, ValueError, AttributeError):
        metrics["decoder"], metrics["truth_source"], metrics["decoding"] = "fmri2text", None, None
    from fmri2text.health import HEALTH_FILE

    try:  # written by annotate; absent for runs decoded with an outside student
        metrics["teacher_health"] = json.loads((run / HEALTH_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        metrics["teacher_health"] = None
    metrics["evaluate_seconds"] = round(time.perf_counter() - t, 2)
    write_json(run / "metrics.json", metrics)
    log(f"evaluate: {len(predictions)} trials, controls {sorted(controls)} "
        f"({metrics['evaluate_seconds']:.1f} s)")
    return metrics
