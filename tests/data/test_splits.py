"""Subject splits by stimulus group, and the leakage check."""

from __future__ import annotations

import pandas as pd
import pytest

from fmri2text.config import SplitConfig
from fmri2text.data.splits import assign_splits, check_leakage
from fmri2text.errors import UserError


def _trials(n_subjects=4, n_groups=10, per_group=3) -> pd.DataFrame:
    rows = []
    for s in range(1, n_subjects + 1):
        for g in range(n_groups):
            for k in range(per_group):
                gid = f"s{s}g{g:02d}"  # groups unique per subject, like HAD's clips
                rows.append({"subject": f"{s:02d}", "group": gid, "stim_file": f"c/{gid}_{k}.mp4"})
    return pd.DataFrame(rows)


def test_heldout_split_is_disjoint_by_group_and_seeded():
    t = assign_splits(_trials(), SplitConfig(n_heldout=2, adapt_fraction=0.5, seed=3))
    assert set(t.loc[t.subject.isin(["01", "02"]), "split"]) == {"train"}
    held = t[t.subject.isin(["03", "04"])]
    assert set(held["split"]) == {"adapt", "test"}
    per_group = held.groupby("group")["split"].nunique()
    assert (per_group == 1).all()  # a group never straddles adapt/test
    assert held.groupby("split")["group"].nunique().to_dict() == {"adapt": 10, "test": 10}
    check_leakage(t)
    again = assign_splits(_trials(), SplitConfig(n_heldout=2, adapt_fraction=0.5, seed=3))
    other = assign_splits(_trials(), SplitConfig(n_heldout=2, adapt_fraction=0.5, seed=4))
    assert (again["split"] == t["split"]).all() and not (other["split"] == t["split"]).all()


def test_explicit_heldout_labels_and_unknown_subject():
    t = assign_splits(_trials(), SplitConfig(heldout=["sub-01"]))
    assert set(t.loc[t.subject == "01", "split"]) == {"adapt", "test"}
    with pytest.raises(UserError, match="unknown subject"):
        assign_splits(_trials(), SplitConfig(heldout=["07"]))
    with pytest.raises(UserError, match="no training subject"):
        assign_splits(_trials(), SplitConfig(n_heldout=4))


def test_group_seen_by_a_training_subject_is_never_test():
    t = _trials()
    t.loc[(t.subject == "01") & (t.group == "s1g00"), "group"] = "shared"
    t.loc[t.subject == "04", "group"] = t.loc[t.subject == "04", "group"].where(
        t.loc[t.subject == "04", "group"] != "s4g00", "shared")
    out = assign_splits(t, SplitConfig(n_heldout=1, adapt_fraction=0.1))
    assert set(out.loc[out.group == "shared", "split"]) <= {"train", "adapt"}
    check_leakage(out)


def test_overlap_drop_removes_test_clips_from_training_subjects():
    t = _trials(n_subjects=3)
    t["group"] = t["group"].str[2:]  # every subject sees the same clips (BOLD Moments)
    t["stim_file"] = ["test/" + g if g < "g03" else "train/" + g for g in t["group"]]
    out = assign_splits(t, SplitConfig(n_heldout=1, test_stim_pattern="^test/", overlap="drop"))
    test = out[out.split == "test"]
    assert set(test["group"]) == {"g00", "g01", "g02"} and (test.subject == "03").all()
    assert not out.loc[out.subject != "03", "stim_file"].str.startswith("test/").any()
    assert out.attrs["n_dropped_overlap"] == 2 * 3 * 3
    check_leakage(out)
    with pytest.raises(UserError, match="without leakage"):
        assign_splits(t, SplitConfig(n_heldout=1, overlap="adapt"))


def test_check_leakage_reports_stim_and_group():
    t = assign_splits(_trials(), SplitConfig(n_heldout=1))
    leaked = t.copy()
    i = leaked.index[leaked.split == "test"][0]
    j = leaked.index[leaked.split == "train"][0]
    leaked.loc[j, "stim_file"] = leaked.loc[i, "stim_file"]
    with pytest.raises(UserError, match="leakage: 1 test stim_file"):
        check_leakage(leaked)
    leaked = t.copy()
    k = leaked.index[leaked.split == "adapt"][0]
    leaked.loc[k, "group"] = leaked.loc[i, "group"]
    with pytest.raises(UserError, match="test group"):
        check_leakage(leaked)


def test_validation_rows_take_whole_groups_of_every_training_subject():
    import numpy as np

    from fmri2text.data.splits import validation_rows

    t = assign_splits(_trials(), SplitConfig(n_heldout=2, adapt_fraction=0.5, seed=3))
    train = np.flatnonzero((t["split"] == "train").to_numpy())
    fit, val = validation_rows(t, train, 0.2, seed=1)
    assert sorted(np.r_[fit, val]) == sorted(train) and not set(fit) & set(val)
    assert not set(t["group"].iloc[fit]) & set(t["group"].iloc[val])  # whole groups only
    assert t.iloc[val].groupby("subject")["group"].nunique().to_dict() == {"01": 2, "02": 2}
    again = validation_rows(t, train, 0.2, seed=1)
    assert np.array_equal(again[0], fit) and np.array_equal(again[1], val)
    all_fit, none = validation_rows(t, train, 0.0)
    assert np.array_equal(all_fit, train) and len(none) == 0
    with pytest.raises(UserError, match="val_fraction"):
        validation_rows(t, train, 1.0)
