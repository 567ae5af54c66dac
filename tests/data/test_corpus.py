"""The MBM corpus from many BIDS datasets, built on a Dask cluster: the same shards with 1 and
2 workers, resumable, bad runs skipped and listed, windows as the prepared trials'."""

import gzip
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from fmri2text import machine
from fmri2text.config import SimulateConfig, load_config
from fmri2text.data import corpus, shards
from fmri2text.errors import UserError
from fmri2text.simulate.bids_writer import simulate_dataset

SIM = SimulateConfig(subjects=2, runs=2, classes=3, seed=1, resolution=12.0, web_clips=2,
                     fps=4, frame_size=16)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> tuple[list[Path], Path]:
    """Two small simulated datasets (other seeds) and a grid mask from the first's runs."""
    root = tmp_path_factory.mktemp("corpus-data")
    roots = [simulate_dataset(root / "lab-a", SIM), simulate_dataset(root / "lab-b", replace(SIM, seed=2))]
    bold = sorted(roots[0].glob("sub-*/**/func/*_bold.nii.gz"))[0]
    img = nib.load(bold)
    mask = (np.asarray(img.dataobj).std(axis=3) > 0).astype(np.uint8)
    grid = root / "mask.nii.gz"
    nib.save(nib.Nifti1Image(mask, img.affine), grid)
    return roots, grid


def _build(roots, out, grid, workers):
    cfg = load_config(None, [f"corpus.workers={workers}"])
    return corpus.build_corpus(roots, out, grid, cfg, log=lambda _: None)


def test_two_workers_write_the_same_shards_as_one(datasets, tmp_path):
    roots, grid = datasets
    one = _build(roots, tmp_path / "one", grid, 1)
    two = _build(roots, tmp_path / "two", grid, 2)
    assert len(one["shards"]) == 8 and one["datasets"] == ["lab-a", "lab-b"]
    assert [(s["file"], s["sha256"]) for s in one["shards"]] == \
           [(s["file"], s["sha256"]) for s in two["shards"]]
    assert {s["dataset"] for s in one["shards"]} == {"lab-a", "lab-b"}
    # the bytes are deterministic per CPU kind: each shard names the machine that made it
    assert all(s["machine"] == machine.describe() for s in one["shards"] + two["shards"])
    assert shards.verify(tmp_path / "two") == []
    shard = pq.ParquetFile(tmp_path / "one" / "shards" / one["shards"][0]["file"])
    table = shard.read()
    T, V = one["window_shape"]
    assert V == int(nib.load(grid).get_fdata().astype(bool).sum())
    assert table.num_rows == one["shards"][0]["n_windows"] > 0
    x = np.asarray(table.column("x").combine_chunks().flatten()).reshape(-1, T, V)
    assert x.dtype == np.float16 and np.isfinite(x).all() and x.astype(np.float32).std() > 0.1
    assert table.column("subject")[0].as_py() == "01" and table.column("start")[1].as_py() == T


def test_windows_are_the_runs_cleaned_smoothed_volumes(datasets):
    """A window is the run's volumes from its start, cleaned and smoothed as prepare's trials."""
    from fmri2text.data.datasets import smooth_windows
    from fmri2text.data.fmri import _cleaned, drift_regressors

    roots, grid = datasets
    cfg = load_config(None, [])
    run = corpus.find_runs(roots)[0]
    g = corpus.CorpusGrid.from_image(grid)
    windows, starts = corpus.run_windows(run, g, corpus.settings_of(cfg))
    img = nib.load(run.bold)
    x = np.asarray(img.dataobj, dtype=np.float32).reshape(-1, img.shape[3])[g.mask].T
    q = np.linalg.qr(drift_regressors(len(x), float(img.header.get_zooms()[3]), cfg.data.high_pass))[0]
    clean = _cleaned(x, q.astype(np.float32), True)
    T = cfg.data.window
    expect = smooth_windows(clean[None, starts[3]:starts[3] + T], g.mask, g.shape, np.asarray(g.affine),
                            cfg.data.smoothing_fwhm)[0]
    assert starts[3] == 3 * T
    np.testing.assert_allclose(windows[3].astype(np.float32), expect, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("form", ["nii", "scaled-gz"])
def test_every_file_form_gives_the_windows_nibabel_reads(datasets, tmp_path, form):
    """The ISA-L reader (voxels in Fortran order, picked by the C-order mask) and the plain
    .nii path give the windows of nibabel's float32 data, scaling included."""
    roots, grid = datasets
    cfg, g = load_config(None, []), corpus.CorpusGrid.from_image(grid)
    run = corpus.find_runs(roots)[0]
    img = nib.load(run.bold)
    path = tmp_path / "sub-01" / "func" / ("sub-01_task-a_bold.nii" if form == "nii" else
                                           "sub-01_task-a_bold.nii.gz")
    path.parent.mkdir(parents=True)
    out = nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header)
    if form == "scaled-gz":
        out.header.set_slope_inter(0.37, 5.0)
    nib.save(out, path)
    other = corpus.find_runs([tmp_path])[0]
    settings = {**corpus.settings_of(cfg), "standardize": False}  # keep the scale visible
    got = corpus.run_windows(other, g, settings)[0].astype(np.float32)
    ref = corpus.run_windows(run, g, settings)[0].astype(np.float32)
    assert ref.std() > 0.1
    if form == "nii":
        np.testing.assert_array_equal(got, ref)
    else:  # drift removal and smoothing are linear: the windows scale with the slope
        np.testing.assert_allclose(got, 0.37 * ref, atol=2e-2, rtol=2e-3)


def test_a_rebuild_keeps_whole_shards_and_redoes_the_rest(datasets, tmp_path):
    roots, grid = datasets
    first = _build(roots, tmp_path, grid, 1)
    assert first["computed"] == 8
    lost = tmp_path / "shards" / first["shards"][2]["file"]
    lost.unlink()  # a shard lost (or never finished: its record then points to nothing)
    again = _build(roots, tmp_path, grid, 1)
    assert again["computed"] == 1 and again["shards"] == first["shards"]


def test_a_bad_run_is_skipped_named_and_listed(datasets, tmp_path):
    roots, grid = datasets
    bad_root = tmp_path / "lab-c"
    shutil.copytree(roots[1], bad_root)
    bad = sorted(bad_root.glob("sub-*/**/func/*_bold.nii.gz"))[1]
    bad.write_bytes(gzip.compress(b"not a nifti image"))
    messages = []
    cfg = load_config(None, [])
    m = corpus.build_corpus([roots[0], bad_root], tmp_path / "c", grid, cfg, log=messages.append)
    assert [s["source"] for s in m["skipped"]] == [str(bad.resolve())]
    assert len(m["shards"]) == 7 and "cannot read" in m["skipped"][0]["reason"]
    assert any(str(bad.resolve()) in msg for msg in messages)
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["skipped"] == m["skipped"]


def test_runs_on_another_grid_are_resampled_onto_the_corpus_grid(datasets, tmp_path):
    roots, grid = datasets
    g = corpus.CorpusGrid.from_image(grid)
    img = nib.load(grid)
    coarse = tmp_path / "coarse.nii.gz"  # the same brain box at twice the voxel size
    aff = img.affine.copy()
    aff[:3, :3] *= 2
    nib.save(nib.Nifti1Image(np.ones([s // 2 + 1 for s in img.shape], np.uint8), aff), coarse)
    run = corpus.find_runs(roots)[0]
    windows, _ = corpus.run_windows(run, corpus.CorpusGrid.from_image(coarse),
                                    corpus.settings_of(load_config(None, [])))
    assert windows.shape[2] == int(corpus.CorpusGrid.from_image(coarse).mask.sum()) != int(g.mask.sum())
    assert np.isfinite(windows.astype(np.float32)).all()


def test_cli_builds_and_refuses_a_missing_dataset(datasets, tmp_path):
    roots, grid = datasets

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "fmri2text.cli", "corpus", "build", *args],
                              capture_output=True, text=True, timeout=600)

    r = cli("--bids", str(roots[0]), "--out", str(tmp_path / "c"), "--grid", str(grid),
            "--workers", "1")
    assert r.returncode == 0, r.stderr
    assert "4 shard(s)" in r.stdout and (tmp_path / "c" / "manifest.json").is_file()
    r = cli("--bids", str(tmp_path / "nope"), "--out", str(tmp_path / "d"), "--grid", str(grid))
    assert r.returncode == 2 and "nope" in r.stderr and "BIDS dataset" in r.stderr
    assert not (tmp_path / "d" / "manifest.json").exists()
    with pytest.raises(UserError, match="3-D"):
        corpus.CorpusGrid.from_image(sorted(roots[0].glob("sub-*/**/func/*_bold.nii.gz"))[0])


@pytest.fixture(scope="module")
def built(datasets, tmp_path_factory):
    roots, grid = datasets
    out = tmp_path_factory.mktemp("built")
    m = corpus.build_corpus(roots, out, grid, load_config(None, ["corpus.row_group=16"]),
                            log=lambda _: None)
    return out, m


def test_ranks_stream_disjoint_shards_and_every_window_of_an_epoch(built):
    out, m = built
    total = m["n_windows"]
    seen = []
    for rank in range(2):
        s = shards.CorpusStream(out, rank=rank, world=2, seed=3)
        assert set(s.files).isdisjoint(shards.CorpusStream(out, rank=1 - rank, world=2).files)
        x = s.batch(sum(s.rows))  # one epoch of this rank
        assert x.shape == (sum(s.rows), *s.input_shape) and s.epoch == 1 and s.k == s.row == 0
        seen.append(x.flatten(1))
    assert sum(len(x) for x in seen) == total
    every = torch.cat(seen)
    assert len(torch.unique(every, dim=0)) == total  # no window twice, none missing


def test_a_stream_resumes_exactly_where_its_state_was_taken(built):
    out, _ = built
    a = shards.CorpusStream(out, seed=5)
    first = a.batch(50)  # crosses row groups (16) and shards
    state = a.state()
    rest = torch.cat([a.batch(37) for _ in range(12)])  # into the next epoch
    b = shards.CorpusStream(out, seed=5)
    b.load_state(json.loads(json.dumps(state)))  # as stored in a checkpoint
    assert torch.equal(torch.cat([b.batch(37) for _ in range(12)]), rest)
    assert not torch.equal(first[:37], rest[:37])
    with pytest.raises(UserError, match="other shards"):
        shards.CorpusStream(out, rank=1, world=2).load_state(state)


def test_stream_windows_are_the_volumes_stage_one_reads(built, datasets):
    """Same crop as TrialWindows over the same mask: an encoder pretrained on the corpus
    takes the decoding data's input shape."""
    from fmri2text.data.datasets import VolumeCrop

    out, _ = built
    _, grid = datasets
    mask = nib.load(grid).get_fdata() != 0
    s = shards.CorpusStream(out)
    assert s.input_shape[1:] == VolumeCrop(mask.reshape(-1), mask.shape).shape
    train, val = shards.split_shards(shards.read_manifest(out), 0.25)
    assert len(val) == 2 and not set(train) & set(val) and len(train) + len(val) == 8


def test_a_truncated_run_on_another_grid_is_a_user_error_naming_it(datasets, tmp_path):
    """Resampling reads the data first, so a truncated file fails as a skippable UserError."""
    roots, grid = datasets
    run = corpus.find_runs(roots)[0]
    cut = tmp_path / "sub-01" / "func" / Path(run.bold).name
    cut.parent.mkdir(parents=True)
    data = Path(run.bold).read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    img = nib.load(grid)
    aff = img.affine.copy()
    aff[:3, :3] *= 2
    coarse = tmp_path / "coarse.nii.gz"
    nib.save(nib.Nifti1Image(np.ones([s // 2 + 1 for s in img.shape], np.uint8), aff), coarse)
    bad = corpus.find_runs([tmp_path])[0]
    with pytest.raises(UserError, match="truncated") as err:
        corpus.run_windows(bad, corpus.CorpusGrid.from_image(coarse),
                           corpus.settings_of(load_config(None, [])))
    assert str(cut.resolve()) in str(err.value)


def test_a_given_scheduler_builds_the_same_shards_after_checking_its_workers(datasets, tmp_path,
                                                                             monkeypatch):
    """``corpus.scheduler``: the same shards as a local build; a worker that cannot see a
    path, or runs other package versions, is a UserError naming it."""
    from distributed import Client, LocalCluster

    roots, grid = datasets
    local = _build(roots, tmp_path / "local", grid, 1)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        cfg = load_config(None, [f"corpus.scheduler={cluster.scheduler_address}"])
        remote = corpus.build_corpus(roots, tmp_path / "remote", grid, cfg, log=lambda _: None)
        assert [s["sha256"] for s in remote["shards"]] == [s["sha256"] for s in local["shards"]]
        with pytest.raises(UserError, match="cannot see this path") as err:
            corpus._check_workers(client, [str(tmp_path / "elsewhere")])
        assert str(tmp_path / "elsewhere") in str(err.value)
        calls = iter([{"pyarrow": "26.0.1"}, {"pyarrow": "25.0.0"}])  # here, then the worker
        monkeypatch.setattr(corpus, "_versions", lambda: next(calls))
        with pytest.raises(UserError, match="pyarrow 26.0.1 here, 25.0.0 there"):
            corpus._check_workers(client, [str(tmp_path)])
