"""Helper run in subprocesses by the training tests (SIGKILL/resume, torchrun): one Stage I
run on a small synthetic experiment. Usage: python _train_script.py RUN_DIR STEPS BATCH [resume]"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from fmri2text.config import load_config  # noqa: E402
from fmri2text.data.datasets import synthetic_experiment  # noqa: E402
from fmri2text.training.stage1 import train_stage1  # noqa: E402


def main() -> None:
    run, steps, batch = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    resume = len(sys.argv) > 4 and sys.argv[4] == "resume"
    windows, targets = synthetic_experiment(grid=(10, 10, 8))
    cfg = load_config(None, ["encoder.preset=tiny", "encoder.projector_dim=32",
                             "encoder.projector_heads=2", f"stage1.steps={steps}",
                             f"stage1.batch_size={batch}", "stage1.lr=3e-3",
                             "stage1.checkpoint_every=5", "stage1.log_every=1",
                             "stage1.keep_last=2",
                             # every step runs: these tests compare whole runs, not stopping
                             "stage1.val_patience=0"])
    m = train_stage1(None, run, cfg, resume=resume, windows=windows, targets=targets,
                     progress=False, log=lambda s: print(s, flush=True))
    rank = int(os.environ.get("RANK", "0"))
    (run / f"result-rank{rank}.json").write_text(json.dumps(
        {k: m.get(k) for k in ("completed", "rank_digests", "weights_synchronised", "num_processes",
                               "steps_done")}))


if __name__ == "__main__":
    main()
