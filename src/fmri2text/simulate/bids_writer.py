"""Write the simulated dataset: a BIDS folder in HAD's layout plus a ground-truth derivative.

``simulate_dataset(out, cfg)`` plans the experiment (classes, each subject's balanced
trial order, one unique clip per trial, 2-3 clips per source-video id, each id shown to one
subject as in HAD), renders and encodes the clips, synthesises every run's BOLD and writes
(see DESIGN §3-4)::

    dataset_description.json  README  participants.tsv  task-action_bold.json ...
    stimuli/<class>/v_<class>_id_<id>_start_<s>_label_1.mp4
    sub-XX/ses-action01/func/sub-XX_ses-action01_task-action_run-RR_{bold.nii.gz,bold.json,events.tsv}
    derivatives/simulation/  captions.json clips.tsv features.npz truth.json rois/ sub-XX/ webclips/

Every file is written atomically and deterministically (same config and seed, same bytes:
gzip without mtime, zip entries with a fixed date, single-threaded bit-exact mp4).
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np

from fmri2text import __version__
from fmri2text.config import SimulateConfig
from fmri2text.errors import UserError
from fmri2text.io import ensure_output_dir, write_bytes, write_json, write_text
from fmri2text.simulate import brain, stimuli

TASK, SESSION = "action", "ses-action01"
TRIALS_PER_RUN, FIRST_TRIAL_S = 60, 12.0
DERIV = Path("derivatives") / "simulation"


def onset_grid() -> np.ndarray:
    """HAD's onsets from the first trial: 4k + 4 floor(k / 5) s, k = 0..59 (groups of 5)."""
    k = np.arange(TRIALS_PER_RUN)
    return (4 * k + 4 * (k // 5)).astype(float)


# ----------------------------------------------------------------------------- file helpers


def _tsv(rows: list[dict], columns: list[str]) -> str:
    def fmt(v) -> str:
        if v is None:
            return "n/a"
        if isinstance(v, (bool, np.bool_)):
            return "1" if v else "0"
        if isinstance(v, (float, np.floating)):
            return repr(round(float(v), 6))
        return str(v)
    return "\t".join(columns) + "\n" + "".join(
        "\t".join(fmt(r[c]) for c in columns) + "\n" for r in rows)


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, tr: float | None = None) -> None:
    """gzip-compressed NIfTI-1 with mtime 0 (byte-reproducible), MNI qform/sform."""
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=4)  # 4 = MNI152
    img.set_sform(affine, code=4)
    if tr is not None:
        img.header.set_zooms(img.header.get_zooms()[:3] + (tr,))
    write_bytes(path, gzip.compress(img.to_bytes(), compresslevel=1, mtime=0))


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An ``np.load``-able npz (no pickle) with fixed zip dates, so its bytes are reproducible."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for key, arr in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(arr), allow_pickle=False)
            zf.writestr(info, member.getvalue())
    write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------- checks


def _check(out: Path, cfg: SimulateConfig) -> Path:
    n_combos = len(stimuli.COLOURS) * len(stimuli.SHAPES) * len(stimuli.ACTIONS)
    span = FIRST_TRIAL_S + onset_grid()[-1] + cfg.clip_seconds
    checks = [
        (cfg.subjects >= 1, "subjects", "at least 1"),
        (cfg.runs >= 1, "runs", "at least 1"),
        (2 <= cfg.classes <= n_combos, "classes", f"between 2 and {n_combos}"),
        (cfg.classes <= cfg.subjects * cfg.runs * TRIALS_PER_RUN, "classes",
         f"at most subjects * runs * {TRIALS_PER_RUN} (every class needs a clip)"),
        (2.0 <= cfg.resolution <= 16.0, "resolution", "between 2 and 16 mm (HAD native: 2)"),
        (cfg.cnr_scale >= 0, "cnr_scale", "zero or positive"),
        (cfg.web_clips >= 0, "web_clips", "zero or positive"),
        (0 < cfg.clip_seconds <= 4.0, "clip_seconds", "in (0, 4] s (trials are 4 s apart)"),
        (cfg.fps >= 1, "fps", "at least 1"),
        (cfg.frame_size >= 16 and cfg.frame_size % 2 == 0, "frame_size",
         "an even number of pixels, at least 16"),
        (cfg.tr > 0, "tr", "positive (HAD: 2.0 s)"),
        (cfg.volumes_per_run * cfg.tr >= span, "volumes_per_run",
         f"enough to cover the trials: volumes_per_run * tr >= {span:g} s (HAD: 156 at 2 s)"),
    ]
    for ok, key, allowed in checks:
        if not ok:
            raise UserError(f"simulate.{key}={getattr(cfg, key)!r} is out of range",
                            fix=f"simulate.{key} must be {allowed}")
    out = ensure_output_dir(out, what="simulation output folder")
    entries = [p for p in out.iterdir() if not p.name.startswith(".")]
    if entries:
        desc = out / "dataset_description.json"
        try:
            ours = "fmri2text-simulate" in desc.read_text(encoding="utf-8")
        except OSError:
            ours = False
        if not ours:
            raise UserError("the output folder is not empty and was not written by the simulator",
                            path=out, fix="pass an empty or new folder")
        for p in entries:  # an earlier simulation: remove what it wrote, then rewrite
            if p.name.startswith("sub-") or p.name in ("stimuli", "derivatives"):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    return out


# ----------------------------------------------------------------------------- the plan


def _balanced_order(n_trials: int, counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Class of each trial of one subject, balanced within and across subjects.

    Whole seeded permutations of the classes (HAD: one per 3-run cycle), then the remainder
    from the classes shown least often so far over all subjects; ``counts`` is updated.
    """
    n_classes = len(counts)
    full, rest = divmod(n_trials, n_classes)
    parts = [rng.permutation(n_classes) for _ in range(full)]
    tie = rng.permutation(n_classes)
    least = tie[np.argsort(counts[tie], kind="stable")][:rest]
    parts.append(rng.permutation(least))
    order = np.concatenate(parts).astype(int)
    np.add.at(counts, order, 1)
    return order


def _split_sources(n: int, rng: np.random.Generator) -> list[int]:
    """Split n clips of a class into source videos of 2-3 clips (1 only when n == 1)."""
    parts: list[int] = []
    while n > 0:
        take = n if n <= 3 else 2 if n == 4 else int(rng.choice([2, 3]))
        parts.append(take)
        n -= take
    return parts


def plan_experiment(cfg: SimulateConfig) -> tuple[list[str], list[dict]]:
    """Classes (ASCII-sorted names) and one row per trial with its clip spec."""
    classes = stimuli.choose_classes(cfg.classes, brain.rng_for(cfg.seed, 1))
    names = [stimuli.class_name(*c) for c in classes]
    per_subject = cfg.runs * TRIALS_PER_RUN
    slots: list[list[tuple[int, int, int]]] = [[] for _ in classes]  # class -> (subject, run, trial)
    counts = np.zeros(cfg.classes, int)
    for s in range(cfg.subjects):
        order = _balanced_order(per_subject, counts, brain.rng_for(cfg.seed, 2, s))
        for i, c in enumerate(order):
            slots[c].append((s, i // TRIALS_PER_RUN, i % TRIALS_PER_RUN))
    taken: set[str] = set()
    trials = []
    scenes = list(stimuli.SCENES)
    for c, ((colour, shape, action), name) in enumerate(zip(classes, names)):
        rng = brain.rng_for(cfg.seed, 3, c)
        # a source video's clips go to one subject: in HAD's metadata 2,868 of 2,873 YouTube
        # ids of four subjects belong to a single subject, so held-out groups are mostly unseen
        order = rng.permutation(len(slots[c]))
        order = order[np.argsort([slots[c][o][0] for o in order], kind="stable")]
        per_subject = np.bincount([s for s, _, _ in slots[c]], minlength=cfg.subjects)
        sizes = [size for n in per_subject for size in _split_sources(int(n), rng)]
        i = 0
        for size in sizes:
            clip_id = stimuli.random_id(rng, taken)
            scene = scenes[int(rng.integers(len(scenes)))]
            texture = int(rng.integers(2 ** 31))
            starts = np.sort(rng.choice(np.arange(0, 180, 0.5), size=size, replace=False))
            for start in starts:
                s, r, k = slots[c][order[i]]
                i += 1
                spec = stimuli.sample_spec(rng, clip_id, float(start), colour, shape, action,
                                           scene, texture)
                stim = f"{name}/v_{name}_id_{clip_id}_start_{start:.1f}_label_1.mp4"
                trials.append({"stim_file": stim, "class_id": c + 1, "class_name": name,
                               "group": clip_id, "subject": s, "run": r, "trial": k, "spec": spec})
    trials.sort(key=lambda t: (t["subject"], t["run"], t["trial"]))
    return names, trials


def _web_specs(cfg: SimulateConfig, taken: set[str]) -> list[stimuli.ClipSpec]:
    """Disjoint 'web videos': random attribute combinations, ids never used by the experiment."""
    rng = brain.rng_for(cfg.seed, 4)
    specs = []
    for _ in range(cfg.web_clips):
        attrs = [list(stimuli.COLOURS), stimuli.SHAPES, list(stimuli.ACTIONS), list(stimuli.SCENES)]
        colour, shape, action, scene = (v[int(rng.integers(len(v)))] for v in attrs)
        specs.append(stimuli.sample_spec(rng, stimuli.random_id(rng, taken), 0.0, colour, shape,
                                         action, scene, int(rng.integers(2 ** 31))))
    return specs


def _render_all(root: Path, items: list[tuple[str, stimuli.ClipSpec]], cfg: SimulateConfig,
                caption_key: int, pool=None) -> tuple[dict, np.ndarray, np.ndarray]:
    """Render, encode and write clips; return captions and (N, 31), (N, 9) features.

    With a process ``pool`` the clips are split into contiguous parts rendered side by side;
    every clip depends only on its spec and index, so the bytes are the same either way.
    """
    parts = [(k, items[k:k + CLIPS_PER_TASK]) for k in range(0, len(items), CLIPS_PER_TASK)]
    args = [(root, part, cfg, caption_key, k) for k, part in parts]
    done = list(pool.map(_render_part, *zip(*args))) if pool and len(parts) > 1 else \
        [_render_part(*a) for a in args]
    caps = {k: v for part_caps, _, _ in done for k, v in part_caps.items()}
    sem = [row for _, part_sem, _ in done for row in part_sem]
    low = [row for _, _, part_low in done for row in part_low]
    return caps, np.asarray(sem, np.float32).reshape(-1, len(stimuli.SEMANTIC_NAMES)), \
        np.asarray(low, np.float32).reshape(-1, len(stimuli.LOWLEVEL_NAMES))


def _render_part(root: Path, items: list[tuple[str, stimuli.ClipSpec]], cfg: SimulateConfig,
                 caption_key: int, start: int) -> tuple[dict, list, list]:
    """Render and write ``items`` (clip ``start + n`` is the n-th); captions and features."""
    caps, sem, low = {}, [], []
    for n, (rel, spec) in enumerate(items, start):
        frames, alpha = stimuli.render_clip(spec, cfg.fps, cfg.clip_seconds, cfg.frame_size)
        write_bytes(root / rel, stimuli.encode_mp4(frames, cfg.fps))
        caps[rel] = stimuli.captions(spec, brain.rng_for(cfg.seed, caption_key, n))
        sem.append(stimuli.semantic_features(spec))
        low.append(stimuli.lowlevel_features(frames, alpha))
    return caps, sem, low


#: clips per rendering task of the process pool (the order of the results is kept)
CLIPS_PER_TASK = 60
#: below this many clips, starting worker processes (~1-2 s each) costs more than it saves
POOL_MIN_CLIPS = 600


def _process_pool(workers: int):
    """A pool of ``workers`` single-threaded processes, or None for one (work runs inline).

    Spawned, not forked: the caller may have started BLAS or OpenMP threads.
    """
    if workers <= 1:
        return None
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_single_threaded)


def _single_threaded() -> None:
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


def _clip_rows(items: list[tuple[str, stimuli.ClipSpec]], extra: list[dict]) -> tuple[list[dict], list[str]]:
    rows = []
    for (rel, spec), more in zip(items, extra):
        rows.append({"stim_file": rel, **more, **spec.attributes(), "moves": stimuli.moves(spec)})
    return rows, list(rows[0]) if rows else ["stim_file"]


# ----------------------------------------------------------------------------- top level


def _top_level_files(out: Path, cfg: SimulateConfig, rng: np.random.Generator) -> None:
    gen = [{"Name": "fmri2text-simulate", "Version": __version__}]
    write_json(out / "dataset_description.json", {
        "Name": "fmri2text simulated video-fMRI dataset (HAD layout)", "BIDSVersion": "1.8.0",
        "DatasetType": "raw", "License": "CC0", "GeneratedBy": gen,
        "HowToAcknowledge": "Simulated data: ground truth in derivatives/simulation."})
    write_text(out / "README", (
        "Simulated with `fmri2text simulate` in the layout of HAD (OpenNeuro ds004488): "
        f"{cfg.subjects} subjects, {cfg.runs} runs of {cfg.volumes_per_run} volumes at TR "
        f"{cfg.tr} s, {TRIALS_PER_RUN} clips per run in groups of 5, {cfg.classes} action classes, "
        f"MNI space at {cfg.resolution} mm, seed {cfg.seed}.\nStimuli are procedurally rendered "
        "clips in stimuli/; captions, clip attributes, features, response maps, HRFs and noise "
        "parameters are in derivatives/simulation/.\n"))
    write_text(out / "participants.tsv", _tsv([
        {"participant_id": f"sub-{s + 1:02d}", "age": int(rng.integers(19, 31)),
         "sex": "MF"[int(rng.integers(2))], "handedness_score": int(rng.integers(60, 101))}
        for s in range(cfg.subjects)], ["participant_id", "age", "sex", "handedness_score"]))
    write_json(out / "participants.json", {
        "participant_id": {"Description": "Participant identifier"},
        "age": {"Description": "Age in years"}, "sex": {"Description": "M or F"},
        "handedness_score": {"Description": "Simulated Edinburgh handedness score"}})
    write_json(out / "task-action_bold.json", {"RepetitionTime": cfg.tr, "TaskName": TASK})
    write_json(out / "task-action_events.json", {
        "onset": {"Description": "From the first trial; the first trial starts 12 s into the scan.",
                  "Units": "s"},
        "trial_type": {"Description": "1 + index of the class folder in stimuli/, ASCII order"},
        "response": {"Description": "1 means the actor changes place, -1 means it stays"},
        "response_time": {"Description": "Reaction time from clip onset", "Units": "s"},
        "stim_file": {"Description": "Clip path relative to stimuli/"}})


def simulate_dataset(out: Path, cfg: SimulateConfig,
                     progress: Callable[[str], None] | None = None,
                     workers: int | None = None) -> Path:
    """Write the whole simulated dataset under ``out`` and return it.

    Parameters
    ----------
    out : folder, absent or empty (or holding an earlier simulation, which is replaced)
    cfg : the simulator's settings (subjects, runs, classes, seed, resolution, cnr_scale, ...)
    progress : called with one-line status messages
    workers : processes rendering clips and synthesising subjects side by side; None: one per
        available core when the dataset has at least ``POOL_MIN_CLIPS`` clips, else 1. The
        bytes written do not depend on it.
    """
    say = progress or (lambda _msg: None)
    out = _check(Path(out), cfg)
    names, trials = plan_experiment(cfg)
    taken = {t["group"] for t in trials}
    webs = _web_specs(cfg, taken)
    _top_level_files(out, cfg, brain.rng_for(cfg.seed, 5))

    say(f"simulate: rendering {len(trials)} experiment clips and {len(webs)} web clips")
    if workers is None:
        big = len(trials) + len(webs) >= POOL_MIN_CLIPS
        workers = len(os.sched_getaffinity(0)) if big else 1
    pool = _process_pool(min(workers, cfg.subjects))
    try:
        return _simulate_all(out, cfg, names, trials, webs, pool, say)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _simulate_all(out: Path, cfg: SimulateConfig, names: list[str], trials: list[dict],
                  webs: list[stimuli.ClipSpec], pool, say: Callable[[str], None]) -> Path:
    """simulate_dataset's work, clips and subjects spread over ``pool`` (None: inline)."""
    items = [(t["stim_file"], t["spec"]) for t in trials]
    caps, sem, low = _render_all(out / "stimuli", items, cfg, 6, pool)
    deriv = out / DERIV
    write_json(deriv / "captions.json", caps)
    feats = np.concatenate([sem, low], 1).astype(np.float64)  # (N, F)
    mean, std = feats.mean(0), feats.std(0)
    std[std < 1e-6] = 1.0
    feats_std = (feats - mean) / std
    feature_names = stimuli.SEMANTIC_NAMES + stimuli.LOWLEVEL_NAMES
    _write_npz(deriv / "features.npz", {
        "stim_file": np.array([t["stim_file"] for t in trials]), "semantic": sem, "lowlevel": low,
        "semantic_names": np.array(stimuli.SEMANTIC_NAMES), "lowlevel_names": np.array(stimuli.LOWLEVEL_NAMES),
        "feature_mean": mean.astype(np.float32), "feature_std": std.astype(np.float32)})
    onsets = onset_grid()
    rows, cols = _clip_rows(items, [{
        "class_id": t["class_id"], "class_name": t["class_name"], "group": t["group"],
        "subject": f"sub-{t['subject'] + 1:02d}", "run": t["run"] + 1, "trial": t["trial"],
        "onset": onsets[t["trial"]]} for t in trials])
    write_text(deriv / "clips.tsv", _tsv(rows, cols))

    web_items = [(f"{s.clip_id}.mp4", s) for s in webs]
    web_caps, web_sem, web_low = _render_all(deriv / "webclips", web_items, cfg, 7, pool)
    write_json(deriv / "webclips" / "captions.json", web_caps)
    web_rows, web_cols = _clip_rows(web_items, [{} for _ in web_items])
    write_text(deriv / "webclips" / "clips.tsv", _tsv(web_rows, web_cols))
    _write_npz(deriv / "webclips" / "features.npz", {
        "file": np.array([f for f, _ in web_items], dtype="<U32").reshape(-1),
        "semantic": web_sem, "lowlevel": web_low})

    say(f"simulate: brains on the MNI grid at {cfg.resolution} mm")
    grid = brain.make_grid(cfg.resolution)
    for roi, mask in [("brain", np.ones(grid.n_voxels, bool))] + list(grid.rois.items()):
        _write_nifti(deriv / "rois" / f"{roi}_mask.nii.gz", grid.to_volume(mask, np.uint8), grid.affine)
    shared = brain.make_shared_maps(grid, len(feature_names), brain.rng_for(cfg.seed, 8))
    jobs = {}
    for s in range(cfg.subjects):
        label = f"sub-{s + 1:02d}"
        rows_s = [i for i, t in enumerate(trials) if t["subject"] == s]
        jobs[label] = (out, cfg, grid, shared, s, label, [trials[i] for i in rows_s], feats_std[rows_s])
    runs = f"{cfg.runs} run{'s' if cfg.runs > 1 else ''}"
    subject_truth = {}
    if pool is None:
        for label, job in jobs.items():
            say(f"simulate: {label} ({runs})")
            subject_truth[label] = _simulate_subject(*job)
    else:  # subjects side by side, results kept in subject order
        say(f"simulate: {', '.join(jobs)} ({runs} each), side by side")
        futures = {label: pool.submit(_simulate_subject, *job) for label, job in jobs.items()}
        subject_truth = {label: f.result() for label, f in futures.items()}

    targets = {k: round(v * cfg.cnr_scale, 6) for k, v in brain.HAD_CNR.items()}
    write_json(deriv / "truth.json", {
        "cnr_definition": brain.CNR_DEFINITION, "cnr_targets": targets, "had_cnr": brain.HAD_CNR,
        "cnr_achieved": {k: v["cnr_achieved"] for k, v in subject_truth.items()},
        "high_pass_hz": brain.HIGH_PASS_HZ, "seed": cfg.seed, "config": asdict(cfg),
        "classes": names, "feature_names": feature_names,
        "map_volumes": feature_names + ["intercept"],
        "response_model": "a[k, v] = intercept[v] + sum_f (features[k, f] - feature_mean[f]) / "
                          "feature_std[f] * maps[v, f]; BOLD = baseline + sum_k a[k] * "
                          "regressor_k + noise (see cnr_definition)",
        "noise_fractions": brain.NOISE_FRACTIONS, "individual_share": brain.INDIVIDUAL_SHARE,
        "deformation_mm": brain.DEFORMATION_MM, "map_fwhm_mm": brain.MAP_FWHM_MM,
        "semantic_share": brain.SEMANTIC_SHARE, "first_trial_s": FIRST_TRIAL_S,
        "onsets_s": onsets.tolist(), "video_codec": stimuli.CODEC,
        "rois": "geometric MNI approximations, see fmri2text.simulate.brain"})
    write_json(deriv / "dataset_description.json", {
        "Name": "fmri2text simulation ground truth", "BIDSVersion": "1.8.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "fmri2text-simulate", "Version": __version__}]})
    return out


def _simulate_subject(out: Path, cfg: SimulateConfig, grid: brain.Grid, shared: np.ndarray, s: int,
                      label: str, trials: list[dict], feats: np.ndarray) -> dict:
    """Synthesise and write one subject's runs and ground truth; return its truth summary."""
    n_sem = len(stimuli.SEMANTIC_NAMES)
    subj = brain.make_subject(grid, shared, n_sem, cfg.cnr_scale, brain.rng_for(cfg.seed, 10, s))
    nvol, tr = cfg.volumes_per_run, cfg.tr
    var = np.zeros(grid.n_voxels)
    keep = cfg.runs * nvol * grid.n_voxels * 8 <= 400e6  # else regenerate the noise in pass 2
    kept = []
    for r in range(cfg.runs):  # pass 1: the noise level that the CNR refers to
        noise_motion = brain.make_noise(grid, subj, nvol, tr, brain.rng_for(cfg.seed, 20, s, r))
        var += brain.highpass_var(noise_motion[0], tr)
        kept.append(noise_motion if keep else None)
    noise_sd = np.sqrt(var / cfg.runs)
    T, b = brain.calibrate(subj, feats, noise_sd)  # (F, V), (V,)
    amp = b + feats @ T  # (N, V) true amplitudes of all the subject's trials
    cnr = amp.std(0) / noise_sd
    achieved = {k: round(float(np.median(cnr[m])), 4) for k, m in grid.rois.items() if m.any()}

    onsets = onset_grid()
    events_rng = brain.rng_for(cfg.seed, 30, s)
    func = out / label / SESSION / "func"
    motion_log = {}
    for r in range(cfg.runs):  # pass 2: the same noise again, plus the responses
        noise, motion = kept[r] or brain.make_noise(grid, subj, nvol, tr,
                                                    brain.rng_for(cfg.seed, 20, s, r))
        kept[r] = None
        idx = [i for i, t in enumerate(trials) if t["run"] == r]
        idx.sort(key=lambda i: trials[i]["trial"])
        vol = brain.synthesize_run(grid, subj, T, b, feats[idx], onsets + FIRST_TRIAL_S,
                                   cfg.clip_seconds, noise, tr)
        stem = f"{label}_{SESSION}_task-{TASK}_run-{r + 1:02d}"
        _write_nifti(func / f"{stem}_bold.nii.gz", vol, grid.affine, tr=tr)
        write_json(func / f"{stem}_bold.json", {"RepetitionTime": tr, "TaskName": TASK,
                                                "SkullStripped": False})
        rows = []
        for k, i in enumerate(idx):
            spec = trials[i]["spec"]
            answered = events_rng.random() > 0.03
            correct = events_rng.random() > 0.05
            resp = (1.0 if stimuli.moves(spec) == correct else -1.0) if answered else None
            rt = round(float(np.clip(events_rng.normal(2.6, 0.2), 1.5, 3.9)), 4) if answered else None
            rows.append({"onset": onsets[k], "duration": float(cfg.clip_seconds),
                         "trial_type": float(trials[i]["class_id"]), "response": resp,
                         "response_time": rt, "stim_file": trials[i]["stim_file"]})
        write_text(func / f"{stem}_events.tsv", _tsv(rows, ["onset", "duration", "trial_type", "response",
                                                            "response_time", "stim_file"]))
        motion_log[f"run-{r + 1:02d}"] = np.round(motion, 5).tolist()

    sub_dir = out / DERIV / label
    maps = np.concatenate([T, b[None]], 0).T.astype(np.float32)  # (V, F + 1)
    _write_nifti(sub_dir / f"{label}_desc-truth_maps.nii.gz", grid.to_volume(maps), grid.affine)
    t = np.round(np.arange(0, 32.0001, 0.1), 1)
    write_text(sub_dir / f"{label}_hrf.tsv",
               _tsv([{"time": ti, "hrf": hi} for ti, hi in zip(t, subj.hrf(t))], ["time", "hrf"]))

    def stats_of(x: np.ndarray) -> dict:
        return {"min": round(float(x.min()), 4), "median": round(float(np.median(x)), 4),
                "max": round(float(x.max()), 4)}
    truth = {
        "hrf": asdict(subj.hrf), "hrf_peak_s": round(float(t[np.argmax(subj.hrf(t))]), 1),
        "ar1_coef": stats_of(subj.ar1), "tsnr": stats_of(subj.tsnr),
        "noise_sd_highpassed": stats_of(noise_sd),
        "physio": {"respiration_hz": subj.resp_hz, "cardiac_hz": subj.card_hz,
                   "cardiac_aliased_hz": round(abs(subj.card_hz - round(subj.card_hz * tr) / tr), 4),
                   "respiration_amplitude": stats_of(subj.physio[0] * np.sqrt(
                       brain.NOISE_FRACTIONS["respiration"])),
                   "cardiac_amplitude": stats_of(subj.physio[1] * np.sqrt(
                       brain.NOISE_FRACTIONS["cardiac"])),
                   "amplitude_units": "fraction of the voxel's noise sd"},
        "mean_response": subj.mean_response,
        "cnr_targets": {k: round(v * cfg.cnr_scale, 6) for k, v in brain.HAD_CNR.items()},
        "cnr_achieved": achieved,
        "motion_columns": ["trans_x_mm", "trans_y_mm", "trans_z_mm", "rot_x_rad", "rot_y_rad",
                           "rot_z_rad"],
        "motion": motion_log}
    write_json(sub_dir / f"{label}_truth.json", truth)
    return truth
