"""Subject splits and the leakage check (DESIGN §6).

Subjects are ``train`` or held out. A held-out subject's trials go to ``adapt`` (unlabeled
fMRI for domain adaptation) or ``test``, split by stimulus *group* (HAD: the YouTube id, so
clips cut from one video never straddle the split), pooled over held-out subjects and
seeded. No test stimulus or group may appear in any train or adapt row:

- ``overlap: adapt`` (HAD, where each clip is shown to one subject): a held-out group that
  some training subject also saw can only be ``adapt``;
- ``overlap: drop`` (BOLD Moments, where everyone sees the same clips): test groups are
  chosen first, and training subjects' trials of those groups are removed from the table.

``test_stim_pattern`` restricts test to matching stimuli (BOLD Moments: ``^test/``).
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from fmri2text.config import SplitConfig
from fmri2text.errors import UserError

SPLITS = ("train", "adapt", "test")
OVERLAP_MODES = ("adapt", "drop")


def heldout_subjects(subjects: list[str], cfg: SplitConfig) -> list[str]:
    """The held-out subject labels: ``cfg.heldout`` (with or without 'sub-'), else the last n."""
    subjects = sorted(subjects)
    if cfg.heldout:
        wanted = [s[4:] if s.startswith("sub-") else s for s in cfg.heldout]
        unknown = [s for s in wanted if s not in subjects]
        if unknown:
            raise UserError(f"split.heldout names unknown subject(s) {unknown}",
                            fix=f"choose among: {', '.join(subjects)}")
        held = sorted(set(wanted))
    else:
        if cfg.n_heldout >= len(subjects):
            raise UserError(f"split.n_heldout={cfg.n_heldout} leaves no training subject "
                            f"({len(subjects)} subjects)",
                            fix=f"set split.n_heldout below {len(subjects)}")
        held = subjects[len(subjects) - cfg.n_heldout:]
    if len(held) >= len(subjects):
        raise UserError("every subject is held out; none is left to train on",
                        fix="list fewer subjects in split.heldout")
    return held


def assign_splits(trials: pd.DataFrame, cfg: SplitConfig) -> pd.DataFrame:
    """Add a ``split`` column (train | adapt | test) to a copy of the trial table.

    Parameters
    ----------
    trials:
        Trial table with ``subject``, ``stim_file`` and ``group`` columns.
    cfg:
        heldout / n_heldout, adapt_fraction, seed, test_stim_pattern, overlap.

    Returns
    -------
    pandas.DataFrame
        The table with ``split``; with ``overlap: drop``, training subjects' trials of test
        groups are removed (their count is in ``attrs['n_dropped_overlap']``).
    """
    if cfg.overlap not in OVERLAP_MODES:
        raise UserError(f"split.overlap={cfg.overlap!r} is not known",
                        fix=f"use one of {', '.join(OVERLAP_MODES)}")
    if not 0 < cfg.adapt_fraction < 1:
        raise UserError(f"split.adapt_fraction={cfg.adapt_fraction} is out of range",
                        fix="use a fraction strictly between 0 and 1")
    table = trials.copy()
    held = heldout_subjects(list(table["subject"].unique()), cfg)
    is_held = table["subject"].isin(held).to_numpy()
    groups = table["group"].astype(str).to_numpy()
    held_groups = sorted(set(groups[is_held]))
    train_groups = set(groups[~is_held])
    candidates = held_groups
    if cfg.test_stim_pattern:
        pattern = re.compile(cfg.test_stim_pattern)
        stim = table["stim_file"].astype(str).to_numpy()
        matching = {g for g, s in zip(groups[is_held], stim[is_held]) if pattern.search(s)}
        candidates = [g for g in held_groups if g in matching]
    if cfg.overlap == "adapt":
        candidates = [g for g in candidates if g not in train_groups]
    if not candidates:
        raise UserError("no stimulus group of the held-out subjects can be tested without leakage",
                        fix="set split.overlap=drop, or check split.test_stim_pattern")
    rng = np.random.default_rng(cfg.seed)
    order = [candidates[i] for i in rng.permutation(len(candidates))]
    if cfg.test_stim_pattern:
        test_groups = set(order)  # every matching group is test; the rest of held-out adapts
    else:
        n_adapt = int(round(cfg.adapt_fraction * len(held_groups)))
        n_test = min(len(order), max(1, len(held_groups) - n_adapt))
        test_groups = set(order[:n_test])
    split = np.where(~is_held, "train", np.where(np.isin(groups, list(test_groups)), "test", "adapt"))
    table["split"] = split
    n_dropped = 0
    if cfg.overlap == "drop":
        drop = (~is_held) & np.isin(groups, list(test_groups))
        n_dropped = int(drop.sum())
        table = table[~drop].reset_index(drop=True)
    table.attrs["n_dropped_overlap"] = n_dropped
    if (table["split"] == "test").sum() == 0 or (table["split"] == "train").sum() == 0:
        raise UserError("the split leaves no test or no training trials",
                        fix="check split.heldout, split.adapt_fraction and split.test_stim_pattern")
    return table


def check_leakage(trials: pd.DataFrame) -> None:
    """Raise UserError when a test stimulus or group appears in any train or adapt row."""
    if "split" not in trials.columns:
        raise UserError("the trial table has no split column", fix="run assign_splits first")
    unknown = sorted(set(trials["split"]) - set(SPLITS))
    if unknown:
        raise UserError(f"unknown split value(s) {unknown}", fix=f"use only {', '.join(SPLITS)}")
    test = trials["split"] == "test"
    seen = trials[~test]
    for col in ("stim_file", "group"):
        if col not in trials.columns:
            continue
        leaked = sorted(set(trials.loc[test, col].astype(str)) & set(seen[col].astype(str)))
        if leaked:
            where = seen[seen[col].astype(str) == leaked[0]]
            raise UserError(
                f"leakage: {len(leaked)} test {col}(s) also appear in training inputs, e.g. "
                f"{leaked[0]!r} in a {where['split'].iat[0]} row of sub-{where['subject'].iat[0]}",
                fix="re-split by stimulus group (assign_splits) and keep test clips out of "
                    "every training step, teacher pretraining included")


def validation_rows(trials: pd.DataFrame, rows: np.ndarray, fraction: float, seed: int = 0
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Split training rows into (fit, validation) by stimulus group, within each subject.

    ``fraction`` of each training subject's stimulus groups (at least one when the subject
    has two or more) go to validation, so no clip of a validation trial is fitted on.
    The recipes choose their stopping step on the validation rows; the held-out subjects are
    never involved. ``fraction`` 0 returns all rows and none.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if not 0 <= fraction < 1:
        raise UserError(f"split.val_fraction={fraction} is out of range",
                        fix="use 0 (no validation split) or a fraction below 1, e.g. 0.1")
    if fraction == 0 or len(rows) == 0:
        return rows, rows[:0]
    rng = np.random.default_rng(seed)
    subjects = trials["subject"].astype(str).to_numpy()[rows]
    key = "group" if "group" in trials.columns else "stim_file"  # a clip is its own group
    groups = trials[key].astype(str).to_numpy()[rows]
    val = np.zeros(len(rows), bool)
    for s in sorted(set(subjects)):
        own = sorted(set(groups[subjects == s]))
        if len(own) < 2:
            continue
        n = max(1, int(round(fraction * len(own))))
        chosen = {own[i] for i in rng.permutation(len(own))[:n]}
        val |= (subjects == s) & np.isin(groups, list(chosen))
    return rows[~val], rows[val]
