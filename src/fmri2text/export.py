"""Export a finished run's decoder to ``RUN/model``: the :class:`~fmri2text.api.Decoder`
folder with its model card (:mod:`fmri2text.model_card`).

Kept apart from both so that the dependencies run one way: ``export`` uses ``api`` and
``model_card``; ``api`` uses ``model_card`` for the plain usage card; ``model_card`` imports
neither.
"""

from __future__ import annotations

import json
from pathlib import Path

from fmri2text.api import Decoder
from fmri2text.model_folder import MASK_FILE, llm_identity
from fmri2text.config import Config
from fmri2text.errors import UserError
from fmri2text.model_card import run_card



def export_run_model(run_dir: str | Path, cfg: Config) -> Path:
    """Write a finished run's decoder to ``RUN/model`` (config, student, mask, model card).

    Parameters
    ----------
    run_dir : path
        A run directory after ``decode`` and ``evaluate`` (``stage2/student.safetensors``,
        ``prepared/``, ``teacher/teacher.json``, ``metrics.json``).
    cfg : Config
        The run's config.

    Returns
    -------
    Path
        ``RUN/model``. Exporting the same run twice writes the same content (the same
        ``config.json``, which records each file's content hash).
    """
    run = Path(run_dir)
    metrics_path = run / "metrics.json"
    if not metrics_path.is_file():
        raise UserError("the run has no metrics.json: nothing to put in the model card",
                        path=metrics_path, fix="finish the run first (fmri2text run, or "
                                               "fmri2text decode then fmri2text evaluate)")
    decoder = Decoder.from_run(run, cfg)
    used = _decoded_mask_hash(run)
    if used is not None and used != decoder.preprocessing.mask_sha256():
        raise UserError("the prepared brain mask differs from the one decode used",
                        path=run / "prepared" / MASK_FILE,
                        fix="rerun fmri2text run so prepare and decode see the same data")
    decoder.llm_info = {**llm_identity(cfg.teacher.llm), "dtype": cfg.teacher.llm_dtype}
    decoder.training = _training_summary(run)
    decoder.card = run_card(run, decoder.config(), json.loads(metrics_path.read_text("utf-8")))
    return decoder.save_pretrained(run / "model")


def _training_summary(run: Path) -> dict:
    """The run, its held-out subjects and their test runs (paths as on this machine)."""
    from fmri2text.data.store import read_trials

    trials = read_trials(run / "prepared" / "trials.tsv")
    test = trials.loc[trials["split"] == "test", ["subject", "bold_path", "events_path"]]
    return {"run": str(run.resolve()),
            "heldout_subjects": sorted(trials.loc[trials["split"] != "train", "subject"].unique()),
            "test_runs": [{"subject": r.subject, "bold": r.bold_path, "events": r.events_path}
                          for r in test.drop_duplicates().itertuples()]}


def _decoded_mask_hash(run: Path) -> str | None:
    try:
        return json.loads((run / "decode.json").read_text(encoding="utf-8")).get("mask_sha256")
    except (OSError, ValueError, AttributeError):
        return None
