"""Steps that chain the package's components into commands (simulate, demo).

Each step reads and writes files in a run directory; the CLI is a thin layer over these.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from fmri2text.config import Config, dump_config, to_dict
from fmri2text.errors import UserError
from fmri2text.io import ensure_output_dir, write_bytes, write_json, write_jsonl, write_text

Log = Callable[[str], None]

SIM_STAMP = ".fmri2text-simulate.json"


def _noop(_: str) -> None:
    pass


def config_hash(section: dict) -> str:
    """A short stable hash of a config section, to tell whether a step's inputs changed."""
    return hashlib.sha256(json.dumps(section, sort_keys=True).encode()).hexdigest()[:16]


def run_simulate(out: Path, cfg: Config, log: Log = _noop, *, reuse: bool = False) -> Path:
    """Write the simulated BIDS dataset to ``out``.

    With ``reuse``, an existing dataset written by the same simulate config is kept as is.
    A non-empty folder not written by the simulator is refused, never overwritten.
    """
    out = Path(out)
    section = to_dict(cfg)["simulate"]
    stamp = out / SIM_STAMP
    written = simulation_stamp(out)
    if written is not None:
        if reuse and written.get("complete", True) and written.get("hash") == config_hash(section):
            log(f"simulate: reusing {out} (same config)")
            return out
    ensure_output_dir(out)
    from fmri2text.simulate.bids_writer import simulate_dataset

    t0 = time.perf_counter()
    # mark the folder as the simulator's, incomplete, before anything else is written: a run
    # killed midway is then rewritten by the next one instead of refused
    write_json(stamp, {"hash": config_hash(section), "complete": False})
    simulate_dataset(out, cfg.simulate, progress=log)
    write_json(stamp, {"hash": config_hash(section), "complete": True, "config": section,
                       "seconds": round(time.perf_counter() - t0, 2)})
    log(f"simulate: {time.perf_counter() - t0:.1f} s")
    return out


def simulation_stamp(out: Path) -> dict | None:
    """The simulator's stamp of ``out`` ({} when damaged), None for an empty or missing folder.

    Raises :class:`UserError` for a non-empty folder the simulator did not write.
    """
    out = Path(out)
    if not (out.is_dir() and any(p.name != ".lock" for p in out.iterdir())):
        return None
    stamp = out / SIM_STAMP
    if not stamp.is_file():
        raise UserError("the output folder is not empty and was not written by the simulator",
                        path=out, fix="pass an empty or new folder to --out")
    try:
        return json.loads(stamp.read_text())
    except (OSError, ValueError):
        return {}  # a damaged stamp: still the simulator's folder, rewrite it


@dataclass
class DemoResult:
    """What ``fmri2text demo`` produced."""

    metrics: dict
    table: object
    metrics_path: Path
    predictions_path: Path
    report_path: Path


def _clip_texts(trials) -> list[str]:
    """The reference text of each trial's clip: its first true caption (or class name)."""
    return [caps[0] if len(caps) else name for caps, name in zip(trials["captions"], trials["class_name"])]


def run_demo(out: Path, cfg: Config, log: Log = _noop) -> DemoResult:
    """Simulate → extract responses → ridge baseline → decode held-out → evaluate.

    Writes ``config.yaml``, ``predictions.jsonl``, ``controls/*.jsonl`` and ``metrics.json``
    into the run directory ``out``.
    """
    out = ensure_output_dir(out, what="run directory")

    from fmri2text.data.bids import load_trials
    from fmri2text.data.fmri import extract_responses
    from fmri2text.data.splits import assign_splits, check_leakage
    from fmri2text.evaluation.baselines import RidgeBaseline
    from fmri2text.evaluation.evaluate import evaluate, format_table, shuffle_within_subject
    from fmri2text.evaluation.metrics import TextScorer

    write_text(out / "config.yaml", dump_config(cfg))
    timings: dict[str, float] = {}

    t = time.perf_counter()
    bids = run_simulate(out / "bids", cfg, log, reuse=True)
    timings["simulate"] = time.perf_counter() - t

    t = time.perf_counter()
    trials = assign_splits(load_trials(bids, cfg.data), cfg.split)
    check_leakage(trials)
    responses = extract_responses(trials, cfg.data)
    timings["extract"] = time.perf_counter() - t
    log(f"data: {len(trials)} trials, {responses.data.shape[1]} features, "
        f"{timings['extract']:.1f} s")

    texts = _clip_texts(trials)
    train = (trials["split"] == "train").to_numpy()
    test = (trials["split"] == "test").to_numpy()
    X = responses.data

    t = time.perf_counter()
    ridge = RidgeBaseline(cfg.baseline)
    train_idx = np.flatnonzero(train)
    # cross-validation folds hold out whole subjects: the penalty is chosen for new people
    ridge.fit(X[train_idx], [texts[i] for i in train_idx],
              groups=trials["subject"].to_numpy()[train_idx])
    test_idx = np.flatnonzero(test)
    test_subjects = trials["subject"].to_numpy()[test_idx]
    decoded = ridge.decode(X[test_idx])
    shuffled = ridge.decode(shuffle_within_subject(X[test_idx], test_subjects, cfg.evaluation.seed))
    timings["ridge"] = time.perf_counter() - t

    instruction = cfg.evaluation.instruction

    def rows(hyps: list[str]) -> list[dict]:
        return [{
            "subject": f"sub-{trials['subject'].iat[i]}",
            "run": int(trials["run"].iat[i]),
            "onset": float(trials["onset"].iat[i]),
            "stim": str(trials["stim_file"].iat[i]),
            "instruction": instruction,
            "video2text": None,
            "fmri2text": h,
            "truth": list(trials["captions"].iat[i]) or None,
        } for i, h in zip(test_idx, hyps)]

    predictions = rows(decoded)
    # the decoder here *is* the ridge baseline, so it is not listed again as its own control
    controls = {"shuffled": rows(shuffled)}
    prompt_only = _prompt_only_control(cfg, len(test_idx), log)
    if prompt_only is not None:
        controls["prompt_only"] = rows(prompt_only)

    t = time.perf_counter()
    pred_emb = ridge.predict_embeddings(X[test_idx])
    cand_emb = ridge.embed([texts[i] for i in test_idx])
    retrieval = {"pred": pred_emb, "candidates": cand_emb, "subjects": test_subjects}
    metrics = evaluate(predictions, controls, TextScorer(cfg.evaluation), cfg.evaluation,
                       retrieval=retrieval)
    metrics["decoder"] = "ridge"
    timings["evaluate"] = time.perf_counter() - t
    metrics["timings_s"] = {k: round(v, 2) for k, v in timings.items()}

    write_jsonl(out / "predictions.jsonl", predictions)
    for name, ctl in controls.items():
        write_jsonl(out / "controls" / f"{name}.jsonl", ctl)
    write_json(out / "metrics.json", metrics)
    if responses.mask_img is not None:
        # where the decoder draws its information: per-voxel norm of the ridge weights
        write_brain_map(out / "brain_map.nii.gz", np.linalg.norm(ridge.coef_, axis=1),
                        responses.mask_img)

    from fmri2text.report.html import build_report

    report = build_report(out, dataset_root=bids)
    log(f"report: {report}")
    return DemoResult(metrics, format_table(metrics), out / "metrics.json",
                      out / "predictions.jsonl", report)


def write_brain_map(path: Path, values: np.ndarray, mask_img) -> None:
    """Write per-feature ``values`` (n_features,) back into the volume of ``mask_img``."""
    import gzip

    from nilearn.masking import unmask

    img = unmask(values.astype(np.float32), mask_img)
    write_bytes(path, gzip.compress(img.to_bytes(), mtime=0))


def _prompt_only_control(cfg: Config, n: int, log: Log) -> list[str] | None:
    """The frozen LLM's answer to the instruction with no fMRI at all (its prior)."""
    try:
        from fmri2text.models.llm import generate, load_llm
    except ImportError:
        log("prompt-only control skipped: no LLM module")
        return None
    model, tokenizer = load_llm()
    answer = generate(model, tokenizer, None, [cfg.evaluation.instruction], max_new_tokens=48)[0]
    return [answer] * n
