"""Pipeline steps before training: teacher fit, annotation, MBM pretraining, and the leakage guard.

Each step reads the BIDS dataset and writes into the run directory RUN::

    RUN/teacher/           teacher.safetensors, teacher.json (checkpoint_hash), teacher_eval.json
    RUN/annotations/       the teacher's answers + video tokens of the *training* clips
    RUN/eval_annotations/  the same for the held-out *test* clips: read by decode only
    RUN/mbm/               mbm.safetensors, mbm_metrics.json

DESIGN §6: no test stimulus (or stimulus group) may reach any training input, teacher
pretraining included. :func:`check_training_inputs` enforces it and every step calls it on
what it is about to train on; a violation stops the run with a :class:`UserError`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd

from fmri2text.config import INSTRUCTIONS, Config
from fmri2text.errors import UserError
from fmri2text.io import ensure_output_dir, write_json

Log = Callable[[str], None]

TEACHER_DIR = "teacher"
EVAL_ANNOTATIONS = "eval_annotations"  # test clips: evaluation only, never a training input
MBM_DIR = "mbm"


# ----------------------------------------------------------------------------- the experiment


def experiment_trials(bids: str | Path, cfg: Config) -> pd.DataFrame:
    """The trial table with its ``split`` column (leakage between splits checked).

    Reads events and headers only, not the BOLD data.
    """
    from fmri2text.data.bids import load_trials
    from fmri2text.data.splits import assign_splits, check_leakage

    trials = assign_splits(load_trials(Path(bids), cfg.data), cfg.split)
    check_leakage(trials)
    return trials.reset_index(drop=True)


def check_training_inputs(trials: pd.DataFrame, clips: Iterable[str], what: str,
                          groups: Iterable[str] | None = None, path: Path | None = None) -> None:
    """Raise :class:`UserError` when a clip about to be trained on is a test stimulus.

    Parameters
    ----------
    trials : the split trial table (``stim_file``, ``group``, ``split``).
    clips : the training input's clip names (stim_file, or a web clip's file name).
    what : the training input, named in the message (e.g. "teacher web clips").
    groups : the clips' stimulus groups (default: looked up in ``trials``; unknown clips
        count as their own group, i.e. their file stem).
    path : the file or folder holding the input, named in the message.
    """
    test = trials[trials["split"] == "test"]
    test_stims = set(test["stim_file"].astype(str))
    test_names = {Path(s).name for s in test_stims} | {Path(s).stem for s in test_stims}
    test_groups = set(test["group"].astype(str))
    clips = [str(c) for c in clips]
    known = dict(zip(trials["stim_file"].astype(str), trials["group"].astype(str)))
    groups = [str(g) for g in groups] if groups is not None else \
        [known.get(c, Path(c).stem) for c in clips]
    for clip, group in zip(clips, groups):
        if clip in test_stims or Path(clip).name in test_names or Path(clip).stem in test_names:
            bad = f"test stimulus {clip!r}"
        elif group in test_groups:
            bad = f"clip {clip!r} of test stimulus group {group!r}"
        else:
            continue
        raise UserError(f"leakage: the {what} contain {bad}, held out for evaluation",
                        path=path, fix="keep every test clip (and every clip of its group) out of "
                                       "all training inputs: remove it there, or change "
                                       "split.heldout / split.seed so it is not a test clip")


def check_annotation_store(run: Path, cfg: Config, trials: pd.DataFrame) -> None:
    """The training annotation store must hold no test clip (and must not be the eval store)."""
    folder = Path(run) / cfg.stage1.annotations
    if Path(cfg.stage1.annotations).name == EVAL_ANNOTATIONS or \
            folder.resolve() == (Path(run) / EVAL_ANNOTATIONS).resolve():
        raise UserError(f"stage1.annotations={cfg.stage1.annotations!r} is the evaluation-only "
                        "store of the test clips", fix="use another folder, e.g. "
                                                       "stage1.annotations=annotations")
    for index in sorted(folder.glob("annotations-*.json")) if folder.is_dir() else []:
        try:
            rows = json.loads(index.read_text(encoding="utf-8"))["rows"]
            clips = [str(r["clip"]) for r in rows]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UserError(f"cannot read the annotation index ({err})", path=index,
                            fix="delete it and rerun fmri2text annotate") from None
        check_training_inputs(trials, clips, "training annotations", path=index)


# ----------------------------------------------------------------------------- teacher


def teacher_checkpoint(run: Path, cfg: Config) -> tuple[Path, str]:
    """(checkpoint path, hash) of the run's teacher, from ``RUN/teacher/teacher.json``."""
    record_path = Path(run) / TEACHER_DIR / "teacher.json"
    if not record_path.is_file():
        raise UserError("the run has no teacher", path=record_path,
                        fix="run fmri2text teacher fit first (or set pipeline.teacher_checkpoint)")
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        path, digest = Path(record["checkpoint"]), str(record["checkpoint_hash"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"cannot read the teacher record ({err})", path=record_path,
                        fix="rerun fmri2text teacher fit") from None
    path = path if path.is_absolute() else record_path.parent / path
    if not path.is_file():
        raise UserError("teacher checkpoint not found", path=path, fix="rerun fmri2text teacher fit")
    return path, digest


def run_teacher_fit(bids: Path, run: Path, cfg: Config, log: Log) -> dict:
    """Fit the teacher on the dataset's web clips (or adopt ``pipeline.teacher_checkpoint``).

    The web clips are checked against the experiment's test stimuli and groups first.
    """
    from fmri2text.training.teacher import (checkpoint_hash, copy_teacher_eval, fit_teacher,
                                            list_web_clips)

    trials = experiment_trials(bids, cfg)
    given = cfg.pipeline.teacher_checkpoint
    out = ensure_output_dir(Path(run) / TEACHER_DIR, what="teacher folder")
    if given:
        path = Path(given).expanduser().resolve()
        if not path.is_file():
            raise UserError("teacher checkpoint not found", path=path,
                            fix="set pipeline.teacher_checkpoint to a teacher.safetensors file, "
                                "or to '' to fit one on the dataset's web clips")
        record = {"checkpoint": str(path), "checkpoint_hash": checkpoint_hash(path),
                  "external": True}
        write_json(out / "teacher.json", record)
        copy_teacher_eval(path.parent, out)  # every run using a teacher keeps its evaluation
        log(f"teacher: using {path}")
        return record
    clips = list_web_clips(bids)
    check_training_inputs(trials, [c.path.name for c in clips], "teacher web clips",
                          path=clips[0].path.parent if clips else None)
    return fit_teacher(bids, out, cfg, log=log, experiment_trials=trials)


def has_web_clips(bids: Path) -> bool:
    """Whether the dataset carries the simulator's captioned web clips."""
    from fmri2text.training.teacher import WEBCLIPS

    return (Path(bids) / WEBCLIPS / "captions.json").is_file()


# ----------------------------------------------------------------------------- annotation


def run_annotate(bids: Path, run: Path, cfg: Config, log: Log) -> dict:
    """Annotate the training clips (``RUN/annotations``) and the test clips for evaluation
    only (``RUN/eval_annotations``, with ``evaluation.instruction``)."""
    from fmri2text.models.teacher import resolve_preset
    from fmri2text.training.annotate import annotate
    from fmri2text.training.teacher import load_teacher, read_clip_frames

    trials = experiment_trials(bids, cfg)
    check_annotation_store(run, cfg, trials)
    path, digest = teacher_checkpoint(run, cfg)
    tcfg = resolve_preset(cfg.teacher)
    stim_paths = dict(zip(trials["stim_file"].astype(str), trials["stim_path"].astype(str)))
    train_clips = sorted(set(trials.loc[trials["split"] == "train", "stim_file"].astype(str)))
    test_clips = sorted(set(trials.loc[trials["split"] == "test", "stim_file"].astype(str)))
    check_training_inputs(trials, train_clips, "training clips to annotate")
    for clip in train_clips + test_clips:
        if not Path(stim_paths[clip]).is_file():
            raise UserError(f"stimulus {clip!r} is missing", path=stim_paths[clip],
                            fix="restore the clip under stimuli/ (or fix stim_file in events.tsv)")

    def frames(clip: str):
        return read_clip_frames(Path(stim_paths[clip]), tcfg.n_frames, tcfg.image_size)

    t0 = time.perf_counter()
    teacher = load_teacher(path, tcfg)
    gen = dict(seed=tcfg.seed, max_new_tokens=tcfg.max_new_tokens, greedy=tcfg.greedy,
               batch_size=tcfg.generate_batch_size)
    log(f"annotate: {len(train_clips)} training clips")
    train = annotate(teacher, digest, train_clips, frames, Path(run) / cfg.stage1.annotations,
                     INSTRUCTIONS, log=log, **gen)
    log(f"annotate: {len(test_clips)} test clips (evaluation only)")
    test = annotate(teacher, digest, test_clips, frames, Path(run) / EVAL_ANNOTATIONS,
                    [cfg.evaluation.instruction], log=log, **gen)
    check_annotation_store(run, cfg, trials)
    health = check_teacher_health(run, cfg, {"training": train, "test": test}, log)
    return {"teacher_hash": digest, "train_clips": len(train_clips), "test_clips": len(test_clips),
            "computed": train["computed"] + test["computed"],
            "reused": train["reused"] + test["reused"], "seconds": time.perf_counter() - t0,
            "health": health}


def check_teacher_health(run: Path, cfg: Config, annotated: dict[str, dict], log: Log) -> dict:
    """Teacher health (fmri2text/health.py) of annotate's results, written to
    ``RUN/teacher_health.json``; a UserError (exit 2) naming the numbers when degenerate,
    unless ``pipeline.allow_degenerate_teacher``."""
    from fmri2text.health import FIX, HEALTH_FILE, answer_token_stats, teacher_health

    parts = {name: answer_token_stats(list(a["answers"].values()), a["tokens"])
             for name, a in annotated.items() if a["tokens"] is not None}
    record = Path(run) / "teacher" / "teacher.json"
    try:
        teacher_eval = json.loads(record.read_text(encoding="utf-8")).get("eval")
    except (OSError, ValueError, AttributeError):
        teacher_eval = None
    health = teacher_health(parts, teacher_eval, cfg.pipeline)
    write_json(Path(run) / HEALTH_FILE, health)
    log("annotate: " + "; ".join(f"{n} clips {p['distinct_answers']}/{p['n_clips']} distinct "
                                 f"answers, token cosine {p['token_cosine']:.3f}"
                                 for n, p in parts.items()))
    if health["degenerate"] and not cfg.pipeline.allow_degenerate_teacher:
        raise UserError("the teacher's targets carry no clip-specific information: "
                        + "; ".join(health["problems"]), path=Path(run) / HEALTH_FILE, fix=FIX)
    if health["degenerate"]:
        log("WARNING: degenerate teacher, going on (pipeline.allow_degenerate_teacher): "
            + "; ".join(health["problems"]))
    return health


# ----------------------------------------------------------------------------- MBM


def run_pretrain_mbm(bids: Path, run: Path, cfg: Config, log: Log) -> dict:
    """Masked brain modeling on unlabeled windows: training subjects' trials and the
    held-out subjects' adapt trials, never a test trial. Writes ``RUN/mbm/``."""
    from fmri2text.data.datasets import TrialWindows, load_windows
    from fmri2text.training.mbm import pretrain_mbm

    windows = load_windows(bids, cfg)
    split = windows.trials["split"].to_numpy()
    rows = np.flatnonzero(np.isin(split, ("train", "adapt")))
    check_training_inputs(windows.trials, windows.trials["stim_file"].iloc[rows],
                          "MBM pretraining windows")
    if (split[rows] == "test").any():  # belt and braces: test rows never get here
        raise UserError("leakage: test trials selected for MBM pretraining",
                        fix="report this as a bug")
    data = TrialWindows(windows, rows)
    log(f"pretrain-mbm: {len(rows)} unlabeled windows of shape {data.input_shape} "
        f"({int((split == 'adapt').sum())} held-out adapt), {cfg.mbm.steps} steps")
    metrics = pretrain_mbm(data, cfg, Path(run) / MBM_DIR)
    log(f"pretrain-mbm: masked MSE {metrics['final']['val_mse_model']:.3f} vs mean baseline "
        f"{metrics['final']['val_mse_mean']:.3f} ({metrics['seconds']:.1f} s)")
    return metrics
