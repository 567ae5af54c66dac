"""Helper run in subprocesses (plain or under torchrun) by the corpus MBM tests: streamed MBM
pretraining of a tiny encoder. Usage: python _mbm_script.py CORPUS RUN STEPS [resume] [stop=K]
(stop=K: rank 0 sends itself SIGTERM when it takes its K-th batch, as a scheduler would)."""

import json
import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from fmri2text.config import load_config  # noqa: E402
from fmri2text.data import shards  # noqa: E402
from fmri2text.training.mbm import pretrain_mbm_corpus  # noqa: E402


def main() -> None:
    corpus, run, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    resume = "resume" in sys.argv[4:]
    stop = next((int(a[5:]) for a in sys.argv[4:] if a.startswith("stop=")), 0)
    rank = int(os.environ.get("RANK", "0"))
    if stop and rank == 0:  # count the training stream's batches (the one given a rank)
        real_init, real_batch, calls = shards.CorpusStream.__init__, shards.CorpusStream.batch, []

        def init(self, *a, **k):
            real_init(self, *a, **k)
            self.training_stream = "rank" in k

        def batch(self, n):
            if self.training_stream:
                calls.append(n)
                if len(calls) == stop:
                    os.kill(os.getpid(), signal.SIGTERM)
            return real_batch(self, n)

        shards.CorpusStream.__init__, shards.CorpusStream.batch = init, batch
    cfg = load_config(None, ["encoder.preset=tiny", f"mbm.steps={steps}", "mbm.batch_size=4",
                             "mbm.checkpoint_every=3", "mbm.log_every=1", "mbm.warmup_steps=2",
                             "mbm.val_windows=16", "mbm.lr=1e-3"])  # as MBM in the test
    m = pretrain_mbm_corpus(corpus, cfg, run / "mbm", resume=resume, progress=False,
                            log=lambda s: print(s, flush=True))
    (run / f"result-rank{rank}.json").write_text(json.dumps(
        {k: m.get(k) for k in ("completed", "rank_digests", "weights_synchronised",
                               "num_processes", "steps_done", "final", "initial")}))


if __name__ == "__main__":
    main()
