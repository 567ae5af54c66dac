"""Trial table from a BIDS video-fMRI dataset: one row per stimulus presentation.

Runs are discovered with pybids in the raw dataset (events) and in ``cfg.bold_dir`` (BOLD:
raw ``func/``, fMRIPrep derivatives flat or standard, CIFTI dtseries). Every events file
must pair with exactly one BOLD file and vice versa. HAD and BOLD Moments differ only in
configuration (``configs/had.yaml``, ``configs/bold_moments.yaml``):

- onsets: HAD counts from the first trial, so ``cfg.onset_offset`` (12 s) is added to a
  run whose first onset is below ``cfg.onset_offset_below`` (6 s; HAD v2 already adds it);
- classes: HAD's class is the folder of ``stim_file`` (spaces or underscores), its id the
  ``trial_type`` column (1 + ASCII sort index of the folder), checked one-to-one;
- groups: HAD's YouTube id (``cfg.group_pattern``); otherwise each clip is its own group;
- captions: a JSON file ``{stim_file: [captions]}`` (or ``{stem: {field: [captions]}}``).
"""

from __future__ import annotations

import gc
import json
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from fmri2text.config import DataConfig
from fmri2text.errors import UserError

#: Volume files read by the loader, and the CIFTI time series.
VOLUME_EXTENSIONS = [".nii.gz", ".nii"]
CIFTI_EXTENSION = ".dtseries.nii"
SPACES = ("raw", "fmriprep", "cifti")
CLASS_SOURCES = ("folder", "column", "none")
TR_TOLERANCE = 1e-3  # seconds


def window_start(onset: np.ndarray | float, tr: float, hrf_delay: float) -> np.ndarray:
    """Index of the first volume of each trial's window: the TR nearest onset + HRF delay.

    Volume ``i`` is taken to be acquired at ``i * tr`` seconds from scan start; the window
    starts at the volume nearest in time to ``onset + hrf_delay`` (rounded, not interpolated).
    """
    return np.rint((np.asarray(onset, dtype=np.float64) + hrf_delay) / tr).astype(np.int64)


def _tasks(cfg: DataConfig) -> list[str] | None:
    """``cfg.task`` as a list ("train,test" → two tasks); empty or '*' means every task."""
    tasks = [t.strip() for t in cfg.task.split(",") if t.strip()]
    return None if not tasks or tasks == ["*"] else tasks


def _layout(path: Path, derivative: bool, space: str):
    """A pybids layout of ``path``. Only BOLD metadata is read (RepetitionTime), so for volumes
    only the ``bold`` suffix is indexed (every level's ``*_bold.json`` is among it: inheritance
    holds) at half the cost; CIFTI file names vary, so all of it is indexed there. The cycle
    collector is off meanwhile: pybids (SQLAlchemy) makes ~200k long-lived objects that it
    would rescan to find no garbage (0.1-0.2 s of a small dataset's indexing)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        from bids import BIDSLayout
        from bids.layout import BIDSLayoutIndexer

        ignore = ["code", "sourcedata", "stimuli", "derivatives", re.compile(r"/\.")]
        only = {} if space == "cifti" else {"suffix": "bold"}
        indexer = BIDSLayoutIndexer(validate=False, ignore=ignore, index_metadata=True, **only)
        config = ["bids", "derivatives"] if derivative else ["bids"]
        try:
            return BIDSLayout(path, validate=False, config=config, indexer=indexer)
        except Exception as err:  # pybids raises several types for unreadable trees
            raise UserError(f"pybids cannot index this folder: {err}", path=path,
                            fix="pass the root of a BIDS dataset (the folder holding sub-*/)") from None
    finally:
        if enabled:
            gc.enable()


def _key(f) -> tuple[str, str, str, int]:
    e = f.get_entities()
    return (str(e["subject"]), str(e.get("session", "")), str(e["task"]), int(e.get("run", 1)))


def _index(files, what: str) -> dict[tuple, str]:
    """Map (subject, session, task, run) → path; two files for one run is an error."""
    out: dict[tuple, str] = {}
    for f in files:
        e = f.get_entities()
        if "subject" not in e or "task" not in e:
            continue
        key = _key(f)
        if key in out:
            raise UserError(
                f"duplicate {what} files for sub-{key[0]} ses-{key[1] or '-'} task-{key[2]} "
                f"run-{key[3]}: {out[key]} and {f.path}", path=f.path,
                fix="keep exactly one file per run (remove the extra copy, or give re-acquired "
                    "runs their own run number)")
        out[key] = f.path
    return out


def _find_bold(root: Path, cfg: DataConfig, tasks: list[str] | None, raw_layout):
    """BOLD files of the configured space, and the layout they were found in."""
    from bids.layout import Query

    if cfg.space not in SPACES:
        raise UserError(f"data.space={cfg.space!r} is not known", fix=f"use one of {', '.join(SPACES)}")
    layout = raw_layout
    if cfg.bold_dir:
        folder = (root / cfg.bold_dir).resolve()
        if not folder.is_dir():
            raise UserError("the BOLD folder (data.bold_dir) does not exist", path=folder,
                            fix="set data.bold_dir to a folder relative to the dataset root, "
                                "e.g. derivatives/fmriprep")
        layout = _layout(folder, derivative=True, space=cfg.space)
    filters: dict = {"space": cfg.bold_space or Query.NONE}
    if tasks:
        filters["task"] = tasks
    if cfg.space == "cifti":
        files = layout.get(extension=CIFTI_EXTENSION, **filters)
    else:
        if cfg.space == "fmriprep":
            filters["desc"] = "preproc"
        files = layout.get(suffix="bold", extension=VOLUME_EXTENSIONS, **filters)
    if not files:
        spaces = sorted({str(s) for s in layout.get_spaces()}) if hasattr(layout, "get_spaces") else []
        raise UserError(
            f"no {cfg.space} BOLD files for task {cfg.task!r} and space {cfg.bold_space or '(none)'!r}",
            path=layout.root,
            fix=f"check data.space, data.task, data.bold_dir and data.bold_space "
                f"(spaces found here: {', '.join(spaces) or 'none'})")
    return files, layout


def _header_info(path: str, cfg: DataConfig) -> tuple[float | None, int]:
    """(TR from the image header or None, number of volumes), header only (no data read)."""
    try:
        img = nib.load(path)
    except Exception as err:
        raise UserError(f"cannot read the image header: {err}", path=path,
                        fix="replace the file with a valid NIfTI/CIFTI image") from None
    if cfg.space == "cifti" or path.endswith(CIFTI_EXTENSION):
        if not isinstance(img, nib.Cifti2Image):
            raise UserError("not a CIFTI-2 dtseries", path=path, fix="pass a .dtseries.nii file")
        series = img.header.get_axis(0)
        if not isinstance(series, nib.cifti2.SeriesAxis):
            raise UserError("the CIFTI file's first axis is not a time series", path=path,
                            fix="pass a dtseries (not a dscalar/dlabel) file")
        step = float(series.step) * (1e-3 if series.unit.upper() == "MSEC" else 1.0)
        return (step or None), int(series.size)
    if len(img.shape) != 4:
        raise UserError(f"BOLD image is {len(img.shape)}-D with shape {img.shape}, expected 4-D",
                        path=path, fix="pass a 4-D time series (x, y, z, time)")
    zoom = float(img.header.get_zooms()[3])
    unit = img.header.get_xyzt_units()[1]
    zoom *= {"msec": 1e-3, "usec": 1e-6}.get(unit, 1.0)
    return (zoom or None), int(img.shape[3])


def _run_tr(path: str, layout, raw_layout, raw_bold: str | None, cfg: DataConfig) -> tuple[float, int]:
    """TR (sidecar checked against header) and volume count of one BOLD file."""
    header_tr, n_volumes = _header_info(path, cfg)
    sidecar_tr = layout.get_metadata(path).get("RepetitionTime")
    if sidecar_tr is None and raw_bold is not None:
        sidecar_tr = raw_layout.get_metadata(raw_bold).get("RepetitionTime")
    if sidecar_tr is not None and (isinstance(sidecar_tr, bool) or not isinstance(sidecar_tr, (int, float))
                                   or not np.isfinite(sidecar_tr)):
        raise UserError(f"the JSON sidecar's RepetitionTime is {sidecar_tr!r}, not a number of seconds",
                        path=path, fix="write RepetitionTime as a positive number (seconds) in the "
                                       "BOLD JSON sidecar, e.g. \"RepetitionTime\": 2.0")
    if sidecar_tr is not None and header_tr is not None and abs(float(sidecar_tr) - header_tr) > TR_TOLERANCE:
        raise UserError(
            f"TR mismatch: sidecar RepetitionTime {float(sidecar_tr)} s but image header "
            f"{header_tr} s", path=path,
            fix="correct the JSON sidecar or the image header so both give the true TR")
    tr = float(sidecar_tr) if sidecar_tr is not None else header_tr
    if tr is None or not tr > 0:
        raise UserError("no repetition time: neither a sidecar RepetitionTime nor a header TR",
                        path=path, fix="add RepetitionTime (seconds) to the BOLD JSON sidecar")
    return tr, n_volumes


def _pair_runs(events: dict, bolds: dict) -> list[tuple[tuple, str, str]]:
    """(key, events path, bold path) per run; a BOLD file without session matches any session."""
    pairs = []
    used: set = set()
    for bkey, bpath in sorted(bolds.items()):
        if bkey in events:
            matches = [bkey]
        elif bkey[1] == "":  # HAD's flat fMRIPrep derivatives drop the session entity
            matches = [k for k in events if (k[0], k[2], k[3]) == (bkey[0], bkey[2], bkey[3])]
        else:
            matches = []
        if not matches:
            raise UserError(
                f"run with no events file (sub-{bkey[0]} task-{bkey[2]} run-{bkey[3]})", path=bpath,
                fix="add the matching *_events.tsv beside the raw BOLD file, or remove the run")
        if len(matches) > 1:
            raise UserError(
                f"BOLD file matches events of several sessions: {[events[m] for m in matches]}",
                path=bpath, fix="add the ses- entity to the BOLD file name")
        if matches[0] in used:
            raise UserError(f"duplicate runs: two BOLD files pair with {events[matches[0]]}",
                            path=bpath, fix="keep exactly one BOLD file per run")
        used.add(matches[0])
        pairs.append((matches[0], events[matches[0]], bpath))
    for k, epath in sorted(events.items()):
        if k not in used:
            raise UserError(
                "events file with no BOLD run", path=epath,
                fix="add the run's BOLD file, or check data.space / data.bold_dir / data.bold_space")
    return pairs


def _check_row_lengths(path: str) -> None:
    """Refuse rows with fewer tab-separated fields than the header (pandas pads them with NaN)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        detail = str(err).strip().replace("C error: ", "")  # pandas' parser prefix
        raise UserError(f"cannot parse the events file: {detail}", path=path,
                        fix="save the file as UTF-8 text, tab-separated, with a header row") from None
    lines = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    if not lines:
        return  # empty: reported by the parser below
    n_fields = len(lines[0][1].split("\t"))
    for number, line in lines[1:]:
        n_row = len(line.split("\t"))
        if n_row < n_fields:
            raise UserError(f"line {number} has {n_row} tab-separated fields, the header has "
                            f"{n_fields}", path=path,
                            fix="give every row a value for every column (write n/a where missing)")


def _read_events(path: str) -> pd.DataFrame:
    _check_row_lengths(path)
    try:
        df = pd.read_csv(path, sep="\t", na_values=["n/a", ""], keep_default_na=False,
                         dtype={"stim_file": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        detail = str(err).strip().replace("C error: ", "")  # pandas' parser prefix
        raise UserError(f"cannot parse the events file: {detail}", path=path,
                        fix="write a tab-separated table with a header row") from None
    missing = [c for c in ("onset", "duration", "stim_file") if c not in df.columns]
    if missing:
        raise UserError(f"events file lacks column(s) {missing}; has {list(df.columns)}", path=path,
                        fix="add onset, duration and stim_file columns (BIDS events)")
    for col in ("onset", "duration"):
        values = pd.to_numeric(df[col], errors="coerce")
        values[~np.isfinite(values)] = np.nan  # 'inf' is not a time
        bad = df[col][values.isna() & df[col].notna()]
        if len(bad) or values[df["stim_file"].notna()].isna().any():
            raise UserError(f"non-numeric or missing {col} values, e.g. {list(bad[:3]) or 'n/a'}",
                            path=path, fix=f"write {col} in seconds for every stimulus row")
        df[col] = values
    negative = df.loc[df["duration"] < 0, "duration"]
    if len(negative):
        raise UserError(f"negative duration values, e.g. {list(negative[:3])}", path=path,
                        fix="write each duration as zero or more seconds")
    return df


def _real(path: str | Path, dirs: dict) -> str:
    """``os.path.realpath(path)`` (as ``Path.resolve``), memoising folders in ``dirs``: resolving
    the folder, then the name if it is a symlink, is resolving the path; the memo saves a
    system call per component per stimulus (HAD: 21,600), plain strings pathlib's parsing."""
    folder, name = os.path.split(os.fspath(path))
    if name in ("", ".", ".."):
        return os.path.realpath(path)
    real = dirs.get(folder)
    if real is None:
        real = dirs[folder] = os.path.realpath(folder)
    full = os.path.join(real, name)
    return os.path.realpath(full) if os.path.islink(full) else full


def _resolve_stim(root: Path, stim_file: str, events_path: str, dirs: dict | None = None) -> Path:
    """Absolute path of a stimulus under ``root/stimuli``; refuses anything outside the root.

    A class folder written with spaces is also looked up with underscores (and vice versa),
    with the class name in the file name changed alike. ``dirs``: folder resolutions
    memoised across the stimuli of one load (see :func:`_real`).
    """
    dirs = {} if dirs is None else dirs
    real_root = _real(root, dirs)
    inside = real_root.rstrip(os.sep) + os.sep
    stimuli = os.path.join(root, "stimuli")
    rel = Path(stim_file)
    candidates = [str(rel)]
    if len(rel.parts) > 1:  # class folder (and file name) with spaces ↔ underscores
        head, name = rel.parts[0], rel.parts[-1]
        for a, b in ((" ", "_"), ("_", " ")):
            if a in head:
                alt_head = head.replace(a, b)
                candidates.append(os.path.join(alt_head, *rel.parts[1:-1], name.replace(head, alt_head)))
                candidates.append(os.path.join(alt_head, *rel.parts[1:]))
    chosen = None
    for cand in candidates:
        path = _real(os.path.join(stimuli, cand), dirs)
        if rel.is_absolute() or not (path == real_root or path.startswith(inside)):
            raise UserError(
                f"stim_file {stim_file!r} points outside the dataset root {real_root}",
                path=events_path,
                fix="stim_file must be a path relative to stimuli/ inside the dataset "
                    "(no '..', no absolute paths, no symlinks leaving the dataset)")
        if chosen is None and os.path.exists(path):
            chosen = path
    return Path(chosen or _real(os.path.join(stimuli, candidates[0]), dirs))


def load_captions(root: Path, cfg: DataConfig) -> dict:
    """The caption JSON ``cfg.captions`` (relative to ``root``), or {} when absent."""
    if not cfg.captions:
        return {}
    path = Path(root) / cfg.captions
    if not path.resolve().is_relative_to(Path(root).resolve()):
        raise UserError(f"data.captions={cfg.captions!r} resolves outside the dataset root",
                        path=path, fix="give data.captions relative to the dataset root, inside it")
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"captions file is not valid JSON: {err}", path=path,
                        fix="write a JSON object {stim_file: [caption, ...]}") from None
    if not isinstance(data, dict):
        raise UserError(f"captions file must hold a JSON object, got {type(data).__name__}",
                        path=path, fix="write a JSON object {stim_file: [caption, ...]}")
    return data


def _captions_of(stim_file: str, captions: dict, field: str, path: Path) -> list[str]:
    """Captions of one stimulus, looked up by stim_file, then file name, then stem."""
    p = Path(stim_file)
    for key in (stim_file, p.name, p.stem):
        if key in captions:
            value = captions[key]
            if isinstance(value, dict):
                if field:
                    value = value.get(field, [])
                else:
                    lists = [v for v in value.values() if isinstance(v, list)]
                    value = lists[0] if len(lists) == 1 else []
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
                raise UserError(f"captions of {key!r} must be a list of strings, got {value!r}",
                                path=path, fix="write each entry as [\"caption\", ...]")
            kept = [c for c in value if c.strip()]
            if not kept:
                raise UserError(f"captions of {key!r} are empty ({value!r})", path=path,
                                fix="write at least one non-blank caption for the clip, or remove "
                                    "its entry (check data.caption_field for dict entries)")
            return kept
    return []


def _class_ids(table: pd.DataFrame, cfg: DataConfig, root: Path) -> pd.Series:
    """Class id per trial: the class column when given (checked one-to-one), else 1 + sort index."""
    names = table["class_name"]
    if cfg.class_source == "none":
        return pd.Series(-1, index=table.index, dtype=np.int64)
    col = cfg.class_column
    if cfg.class_source == "folder" and col in table.columns and table[col].notna().all():
        ids = pd.to_numeric(table[col], errors="coerce")
        if ids.isna().any() or not np.all(ids == np.round(ids)):
            bad = table.loc[ids.isna() | (ids != np.round(ids)), "events_path"].iat[0]
            raise UserError(f"class column {col!r} holds non-integer values", path=bad,
                            fix=f"write integer class ids in {col!r}, or set data.class_column=''")
        ids = ids.astype(np.int64)
        pairs = pd.DataFrame({"name": names, "id": ids, "ev": table["events_path"]})
        for key, other in (("name", "id"), ("id", "name")):
            n = pairs.groupby(key)[other].nunique()
            if (n > 1).any():
                k = n.index[n > 1][0]
                clash = pairs[pairs[key] == k]
                raise UserError(
                    f"class {key} {k!r} has several {other}s: {sorted(map(str, clash[other].unique()))}",
                    path=clash["ev"].iat[0],
                    fix=f"make {col!r} and the stim_file folder agree one-to-one")
        return ids
    classes = sorted(set(names))
    stim_root = root / "stimuli"
    if cfg.class_source == "folder" and stim_root.is_dir():  # every class, even unseen ones
        folders = {p.name.replace("_", " ") for p in stim_root.iterdir() if p.is_dir()}
        if set(classes) <= folders:
            classes = sorted(folders)
    index = {c: i + 1 for i, c in enumerate(classes)}
    return names.map(index).astype(np.int64)


def _run_table(key, events_path, bold_path, root, cfg, captions, caption_path, tr, n_volumes,
               dirs: dict | None = None):
    df = _read_events(events_path)
    n_rows = len(df)
    df = df[df["stim_file"].notna()].reset_index(drop=True)  # e.g. BOLD Moments' oddballs
    if df.empty:
        raise UserError("events file has no stimulus rows (every stim_file is n/a)", path=events_path,
                        fix="list the clips shown, one row each, with their stim_file")
    onsets = df["onset"].to_numpy(np.float64)
    if onsets.min() < cfg.onset_offset_below:
        onsets = onsets + cfg.onset_offset
    group_re = re.compile(cfg.group_pattern) if cfg.group_pattern else None
    rows = {
        "subject": key[0], "session": key[1], "task": key[2], "run": key[3],
        "onset": onsets, "duration": df["duration"].to_numpy(np.float64),
        "stim_file": df["stim_file"].astype(str).to_numpy(),
    }
    stim = rows["stim_file"]
    rows["stim_path"] = [str(_resolve_stim(root, s, events_path, dirs)) for s in stim]
    if cfg.class_source == "folder":
        rows["class_name"] = [Path(s).parts[0].replace("_", " ") if len(Path(s).parts) > 1 else ""
                              for s in stim]
    elif cfg.class_source == "column":
        if cfg.class_column not in df.columns:
            raise UserError(f"no class column {cfg.class_column!r}; columns: {list(df.columns)}",
                            path=events_path, fix="set data.class_column, or data.class_source=none")
        rows["class_name"] = df[cfg.class_column].astype(str).to_numpy()
    else:
        rows["class_name"] = [""] * len(df)
    groups = []
    for s in stim:
        m = group_re.search(Path(s).name) if group_re else None
        groups.append((m.groupdict().get("group") or m.group(1 if m.re.groups else 0)) if m else s)
    rows["group"] = groups
    rows["captions"] = [_captions_of(s, captions, cfg.caption_field, caption_path) for s in stim]
    table = pd.DataFrame(rows)
    table["bold_path"] = bold_path
    table["events_path"] = events_path
    table["tr"] = tr
    table["n_volumes"] = n_volumes
    table["n_dropped_rows"] = n_rows - len(df)
    for col in df.columns:  # keep the dataset's own columns (trial_type, response, ...)
        if col not in table.columns:
            table[col] = df[col].to_numpy()
    first = window_start(onsets, tr, cfg.hrf_delay)
    last = first + cfg.window - 1
    out_of_run = (last >= n_volumes) | (first < 0)
    if out_of_run.any():
        i = int(np.argmax(out_of_run))  # the first trial outside the run
        raise UserError(
            f"trial at onset {onsets[i]:.2f} s (absolute) needs volumes {int(first[i])}..{int(last[i])} "
            f"(HRF delay {cfg.hrf_delay} s, window {cfg.window}, TR {tr} s) but the run has "
            f"{n_volumes} volumes ({bold_path})", path=events_path,
            fix="check the onsets and data.onset_offset, or lower data.hrf_delay / data.window")
    return table


def load_trials(root: Path, cfg: DataConfig) -> pd.DataFrame:
    """Read every run of a BIDS video-fMRI dataset into one trial table.

    Parameters
    ----------
    root:
        The BIDS dataset root (holding ``sub-*/``, ``stimuli/``, ``derivatives/``).
    cfg:
        Layout settings (``space``, ``task``, ``bold_dir``, ``bold_space``, onset offset,
        class/group/caption sources) and the window used to check onsets.

    Returns
    -------
    pandas.DataFrame
        One row per trial, sorted by subject, session, task, run and onset. Columns:
        subject, session, task, run (int), onset (absolute s), duration, stim_file,
        stim_path, class_name, class_id, group, captions (list[str]), bold_path,
        events_path, tr, n_volumes, n_dropped_rows, plus the events file's own columns.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError("dataset folder not found", path=root, fix="pass the root of a BIDS dataset")
    if cfg.class_source not in CLASS_SOURCES:
        raise UserError(f"data.class_source={cfg.class_source!r} is not known",
                        fix=f"use one of {', '.join(CLASS_SOURCES)}")
    tasks = _tasks(cfg)
    raw = _layout(root, derivative=False, space=cfg.space)
    ev_filter = {"task": tasks} if tasks else {}
    events = _index(raw.get(suffix="events", extension=".tsv", **ev_filter), "events")
    raw_bolds = _index(raw.get(suffix="bold", extension=VOLUME_EXTENSIONS, **ev_filter), "raw BOLD")
    bold_files, layout = _find_bold(root, cfg, tasks, raw)
    bolds = _index(bold_files, f"{cfg.space} BOLD")
    if not events:
        raise UserError(f"no events files for task {cfg.task!r}", path=root,
                        fix="check data.task (tasks found: " + ", ".join(raw.get_tasks()) + ")")
    captions = load_captions(root, cfg)
    caption_path = root / cfg.captions
    tables = []
    real_root = root.resolve()
    dirs: dict = {}  # folder resolutions shared by every stimulus lookup of this load
    for key, events_path, bold_path in _pair_runs(events, bolds):
        for path in (events_path, bold_path):
            if not Path(path).resolve().is_relative_to(real_root):
                raise UserError(
                    f"file resolves outside the dataset root {real_root} "
                    f"(to {Path(path).resolve()})", path=path,
                    fix="keep the dataset's files inside its root: copy them in instead of "
                        "linking out of the dataset")
        tr, n_volumes = _run_tr(bold_path, layout, raw, raw_bolds.get(key), cfg)
        tables.append(_run_table(key, events_path, bold_path, root, cfg, captions, caption_path,
                                 tr, n_volumes, dirs))
    table = pd.concat(tables, ignore_index=True)
    table["class_id"] = _class_ids(table, cfg, root)
    table = table.sort_values(["subject", "session", "task", "run", "onset"], kind="stable")
    table = table.reset_index(drop=True)
    table["run"] = table["run"].astype(np.int64)
    return table
