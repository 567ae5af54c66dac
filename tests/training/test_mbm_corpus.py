"""MBM streamed from a corpus in two torchrun processes: ranks in sync, an interrupted run
resumed from its checkpoint ends with the uninterrupted run's weights, Stage I loads it."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fmri2text.config import SimulateConfig, load_config
from fmri2text.data import corpus, shards
from fmri2text.simulate.bids_writer import simulate_dataset

SCRIPT = Path(__file__).with_name("_mbm_script.py")
#: the settings of _mbm_script.py at 9 steps, for the command line
MBM = ["encoder.preset=tiny", "mbm.steps=9", "mbm.batch_size=4", "mbm.checkpoint_every=3",
       "mbm.log_every=1", "mbm.warmup_steps=2", "mbm.val_windows=16", "mbm.lr=1e-3"]
SIM = SimulateConfig(subjects=2, runs=2, classes=3, seed=4, resolution=12.0, web_clips=2,
                     fps=4, frame_size=16)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("mbm-corpus")
    roots = [simulate_dataset(root / "a", SIM), simulate_dataset(root / "b", replace(SIM, seed=5))]
    img = nib.load(sorted(roots[0].glob("sub-*/**/func/*_bold.nii.gz"))[0])
    grid = root / "mask.nii.gz"
    nib.save(nib.Nifti1Image((np.asarray(img.dataobj).std(axis=3) > 0).astype(np.uint8),
                             img.affine), grid)
    corpus.build_corpus(roots, root / "corpus", grid, load_config(None, ["corpus.row_group=8"]),
                        log=lambda _: None)
    return root / "corpus"


def _torchrun(*args, nproc=2):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    if not Path(torchrun).exists():
        pytest.skip("torchrun is not installed")
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", str(nproc), str(SCRIPT),
                           *map(str, args)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "address" in proc.stderr.lower() and "use" in proc.stderr.lower():
        pytest.skip(f"torchrun could not start here: {proc.stderr[-300:]}")
    return proc


def _results(run):
    return [json.loads((run / f"result-rank{r}.json").read_text()) for r in (0, 1)]


def test_two_processes_stay_in_sync_and_resume_exactly(built, tmp_path):
    straight = tmp_path / "straight"
    proc = _torchrun(built, straight, 9)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = _results(straight)
    assert all(r["completed"] and r["weights_synchronised"] and r["num_processes"] == 2 for r in a)
    assert (straight / "mbm" / "mbm.safetensors").is_file() and a[0]["final"]["val_mse_model"] > 0

    cut = tmp_path / "cut"  # SIGTERM during step 5: both ranks stop, checkpoint at 5
    proc = _torchrun(built, cut, 9, "stop=5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    b = _results(cut)
    assert not b[0]["completed"] and b[0]["steps_done"] == b[1]["steps_done"] == 5
    proc = _torchrun(built, cut, 9, "resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    c = _results(cut)
    assert c[0]["completed"] and c[0]["steps_done"] == 9
    assert c[0]["rank_digests"] == a[0]["rank_digests"]  # the uninterrupted run's weights
    log = [json.loads(x) for x in (cut / "mbm" / "log.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (straight / "mbm" / "log.jsonl").read_text().splitlines()]
    assert [r["total"] for r in log] == [r["total"] for r in ref]

    one = subprocess.run([sys.executable, "-m", "fmri2text.training.cli_train", "mbm", "--corpus",
                          str(built), "--run", str(cut), "--resume", "--no-progress", *MBM],
                         capture_output=True, text=True, timeout=600)  # 1 process, 2 positions
    assert one.returncode == 2 and "2 process(es)' positions" in one.stderr, one.stderr[-500:]


def test_stage_one_starts_from_the_corpus_encoder(built, tmp_path):
    """The encoder trained on the corpus loads into a student for windows on the same grid."""
    from fmri2text.models.brain_encoder import load_mae
    from fmri2text.training.stage1 import build_student

    proc = subprocess.run([sys.executable, str(SCRIPT), str(built), str(tmp_path), "3"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    path = tmp_path / "mbm" / "mbm.safetensors"
    mae = load_mae(path)
    shape = shards.CorpusStream(built).input_shape
    assert tuple(mae.input_shape) == shape
    cfg = load_config(None, ["encoder.preset=tiny", "encoder.projector_dim=32",
                             "encoder.projector_heads=2", "encoder.linear_rank=0"])
    student, spec = build_student(cfg, shape, d_llm=32, n_tokens=4, mbm=path)
    enc = dict(student.encoder.named_parameters())
    for k, v in mae.encoder.named_parameters():
        assert np.allclose(enc[k].detach().numpy(), v.detach().numpy()), k
