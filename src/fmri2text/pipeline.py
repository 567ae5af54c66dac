"""Steps that chain the package's components into commands (simulate, run, demo).

Each step reads and writes files in a run directory; the CLI is a thin layer over these.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fmri2text import machine
from fmri2text.config import Config, dump_config, to_dict
from fmri2text.errors import UserError
from fmri2text.io import ensure_output_dir, write_json, write_text

Log = Callable[[str], None]

SIM_STAMP = ".fmri2text-simulate.json"


def _noop(_: str) -> None:
    pass


def config_hash(section: dict) -> str:
    """A short stable hash of a config section, to tell whether a step's inputs changed."""
    return hashlib.sha256(json.dumps(section, sort_keys=True).encode()).hexdigest()[:16]


def run_simulate(out: Path, cfg: Config, log: Log = _noop, *, reuse: bool = False) -> Path:
    """Write the simulated BIDS dataset to ``out``.

    With ``reuse``, an existing dataset written by the same simulate config is kept as is.
    A non-empty folder not written by the simulator is refused, never overwritten.
    """
    out = Path(out)
    section = to_dict(cfg)["simulate"]
    stamp = out / SIM_STAMP
    written = simulation_stamp(out)
    if written is not None:
        if reuse and written.get("complete", True) and written.get("hash") == config_hash(section):
            log(f"simulate: reusing {out} (same config)")
            return out
    ensure_output_dir(out)
    from fmri2text.simulate.bids_writer import simulate_dataset

    t0 = time.perf_counter()
    # mark the folder as the simulator's, incomplete, before anything else is written: a run
    # killed midway is then rewritten by the next one instead of refused
    write_json(stamp, {"hash": config_hash(section), "complete": False})
    simulate_dataset(out, cfg.simulate, progress=log)
    write_json(stamp, {"hash": config_hash(section), "complete": True, "config": section,
                       "seconds": round(time.perf_counter() - t0, 2)})
    log(f"simulate: {time.perf_counter() - t0:.1f} s")
    return out


def simulation_stamp(out: Path) -> dict | None:
    """The simulator's stamp of ``out`` ({} when damaged), None for an empty or missing folder.

    Raises :class:`UserError` for a non-empty folder the simulator did not write.
    """
    out = Path(out)
    if not (out.is_dir() and any(p.name != ".lock" for p in out.iterdir())):
        return None
    stamp = out / SIM_STAMP
    if not stamp.is_file():
        raise UserError("the output folder is not empty and was not written by the simulator",
                        path=out, fix="pass an empty or new folder to --out")
    try:
        return json.loads(stamp.read_text())
    except (OSError, ValueError):
        return {}  # a damaged stamp: still the simulator's folder, rewrite it


# ----------------------------------------------------------------------------- fmri2text run

STEPS_FILE = "steps.json"
#: step → the config keys it reads (a change reruns it; its new outputs rerun what follows)
STEP_SECTIONS: dict[str, tuple[str, ...]] = {
    "prepare": ("seed", "data", "split"),
    "teacher": ("seed", "teacher", "evaluation.instruction", "pipeline.teacher_checkpoint"),
    "annotate": ("seed", "teacher", "data", "split", "evaluation.instruction", "stage1.annotations",
                 "pipeline.min_distinct_answer_fraction", "pipeline.max_token_cosine",
                 "pipeline.min_teacher_gain", "pipeline.allow_degenerate_teacher"),
    "pretrain-mbm": ("seed", "data", "split", "encoder", "mbm"),
    "stage1": ("seed", "data", "split", "encoder", "loss", "stage1"),
    "stage2": ("seed", "data", "split", "encoder", "loss", "stage1.annotations", "stage2",
               "teacher.llm", "teacher.llm_dtype", "teacher.system_prompt"),
    "decode": ("seed", "data", "split", "teacher", "baseline", "pipeline", "evaluation.instruction",
               "evaluation.seed", "stage1.annotations",
               # the scorer that chooses the decoding on validation trials (decode_choose)
               "evaluation.bertscore_model", "evaluation.bertscore_layers",
               "evaluation.bertscore_idf", "evaluation.bertscore_rescale",
               "evaluation.bertscore_baseline"),
    "evaluate": ("evaluation",),
    "report": (),
    "export": ("seed", "data", "split", "encoder", "loss", "stage2", "teacher", "pipeline",
               "evaluation"),
}


def section_hash(cfg: Config, keys: tuple[str, ...]) -> str:
    """Hash of the config values under ``keys`` (dotted prefixes)."""
    full = to_dict(cfg)
    picked = {}
    for key in keys:
        node = full
        for part in key.split("."):
            node = node[part]
        picked[key] = node
    return config_hash(picked)


def file_digest(path: Path) -> str:
    """sha256 (16 hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


def dataset_fingerprint(bids: Path) -> str:
    """Hash of every dataset file's relative path, size and mtime (stat only, no reads)."""
    h = hashlib.sha256()
    root = Path(bids)
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name not in (".lock", SIM_STAMP):
            st = p.stat()
            h.update(f"{p.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


@dataclass
class Step:
    """One step of ``fmri2text run``: what it reads and writes, and how to run it."""

    name: str
    fn: Callable[[], object]
    outputs: list[str]  # files relative to RUN whose digests later steps depend on
    after: list[str]  # earlier steps whose outputs are this step's inputs
    reads_dataset: bool = True


class StepRunner:
    """Runs steps in order, skipping one whose config keys, inputs and outputs are unchanged.

    ``RUN/steps.json`` holds, per completed step, ``{config_hash, inputs, outputs, seconds,
    machine}``; inputs are the dataset fingerprint and the output digests of the steps it
    follows; ``machine`` is where it ran (:func:`fmri2text.machine.describe`: outputs are
    deterministic per CPU kind), a record only.
    A step is rerun when any of these differ or an output file is missing or altered.
    """

    def __init__(self, run: Path, cfg: Config, dataset: str, log: Log = _noop):
        self.run, self.cfg, self.dataset, self.log = Path(run), cfg, dataset, log
        self.path = self.run / STEPS_FILE
        try:
            self.records = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(self.records, dict):
                self.records = {}
        except (OSError, ValueError):
            self.records = {}
        self.ran: list[str] = []
        self.skipped: list[str] = []

    def _inputs(self, step: Step) -> dict:
        inputs = {f"{s}:{k}": v for s in step.after
                  for k, v in (self.records.get(s) or {}).get("outputs", {}).items()}
        if step.reads_dataset:
            inputs["dataset"] = self.dataset
        return inputs

    def _outputs(self, step: Step) -> dict:
        out = {}
        for rel in step.outputs:
            p = self.run / rel
            out[rel] = file_digest(p) if p.is_file() else None
        return out

    def up_to_date(self, step: Step) -> bool:
        rec = self.records.get(step.name)
        if not rec:
            return False
        return (rec.get("config_hash") == section_hash(self.cfg, STEP_SECTIONS[step.name])
                and rec.get("inputs") == self._inputs(step)
                and rec.get("outputs") == self._outputs(step)
                and all(v is not None for v in rec.get("outputs", {}).values()))

    def run_step(self, step: Step, index: int, total: int) -> None:
        tag = f"[{index}/{total}] {step.name}"
        if self.up_to_date(step):
            self.skipped.append(step.name)
            self.log(f"{tag}: unchanged, skipped")
            return
        self.log(f"{tag}: running")
        self.records.pop(step.name, None)
        write_json(self.path, self.records)  # a killed step is never taken as complete
        t0 = time.perf_counter()
        result = step.fn()
        seconds = time.perf_counter() - t0
        outputs = self._outputs(step)
        missing = [k for k, v in outputs.items() if v is None]
        if missing:
            raise RuntimeError(f"step {step.name} did not write {missing}")
        self.records[step.name] = {"config_hash": section_hash(self.cfg, STEP_SECTIONS[step.name]),
                                   "inputs": self._inputs(step), "outputs": outputs,
                                   "seconds": round(seconds, 2), "machine": machine.describe()}
        if isinstance(result, dict) and result.get("health") is not None:
            self.records[step.name]["health"] = result["health"]  # e.g. the teacher's
        write_json(self.path, self.records)
        self.ran.append(step.name)
        self.log(f"{tag}: done in {seconds:.1f} s")


@dataclass
class RunResult:
    """What ``fmri2text run`` did."""

    ran: list[str]
    skipped: list[str]
    metrics_path: Path
    report_path: Path
    model_path: Path
    table: str


def run_pipeline(bids: Path | None, out: Path, cfg: Config, *, simulate: bool = False,
                 log: Log = _noop) -> RunResult:
    """prepare → teacher fit → annotate → pretrain-mbm → stage1 → stage2 → decode →
    evaluate → report → export (``out/model``) into the run directory ``out``, skipping
    unchanged steps. pretrain-mbm runs when Stage I starts from it
    (``stage1.mbm_checkpoint=auto``).

    With ``simulate`` the dataset is first simulated into ``out/bids`` (reused when the
    simulate config is unchanged). The teacher step runs when the dataset has the
    simulator's web clips or ``pipeline.teacher_checkpoint`` is set; otherwise the run
    stops with a :class:`UserError` before anything is trained.
    """
    from fmri2text import decoding, steps
    from fmri2text.data.datasets import load_windows
    from fmri2text.data.store import prepare
    from fmri2text.evaluation.evaluate import format_table
    from fmri2text.export import export_run_model
    from fmri2text.report.html import build_report
    from fmri2text.training.stage1 import train_stage1
    from fmri2text.training.stage2 import train_stage2

    out = ensure_output_dir(out, what="run directory")
    t_all = time.perf_counter()
    if simulate:
        bids = run_simulate(out / "bids", cfg, log, reuse=True)
    bids = Path(bids)
    trials = steps.experiment_trials(bids, cfg)  # a bad dataset stops the run here
    if not (cfg.pipeline.teacher_checkpoint or steps.has_web_clips(bids)):
        raise UserError("no teacher: the dataset has no web clips to fit one on and "
                        "pipeline.teacher_checkpoint is empty", path=bids,
                        fix="set pipeline.teacher_checkpoint=PATH/teacher.safetensors, or "
                            "simulate a dataset with web clips (fmri2text run --simulate)")
    write_text(out / "config.yaml", dump_config(cfg))
    runner = StepRunner(out, cfg, dataset_fingerprint(bids), log)
    quiet = _quiet(log)
    # the dataset's fMRI windows, read by the first step that needs them
    windows = functools.cache(lambda: load_windows(bids, cfg))

    def stage1() -> None:
        steps.check_annotation_store(out, cfg, trials)
        m = train_stage1(bids, out, cfg, log=quiet, progress=False, windows=windows())
        if not m.get("completed"):
            raise UserError("Stage I was interrupted", path=out / "stage1",
                            fix="rerun fmri2text run (or fmri2text train stage1 --resume)")

    def stage2() -> None:
        steps.check_annotation_store(out, cfg, trials)
        m = train_stage2(bids, out, cfg, log=quiet, progress=False, windows=windows())
        if not m[m["main"]].get("completed"):
            raise UserError("Stage II was interrupted", path=out / "stage2",
                            fix="rerun fmri2text run (or fmri2text train stage2 --resume)")

    ann = [f"{cfg.stage1.annotations}/annotations-{{h}}.json", "eval_annotations/annotations-{h}.json"]
    mbm = cfg.stage1.mbm_checkpoint == "auto"  # Stage I starts from this run's MBM encoder
    plan = [
        Step("prepare", lambda: prepare(bids, out / "prepared", cfg, log=quiet),
             ["prepared/manifest.json"], []),
        Step("teacher", lambda: steps.run_teacher_fit(bids, out, cfg, log), ["teacher/teacher.json"], []),
        Step("annotate", lambda: steps.run_annotate(bids, out, cfg, quiet), [], ["teacher"]),
        Step("pretrain-mbm", lambda: steps.run_pretrain_mbm(bids, out, cfg, log),
             ["mbm/mbm.safetensors"], []) if mbm else None,
        Step("stage1", stage1, ["stage1/student.safetensors"],
             ["annotate", "pretrain-mbm"] if mbm else ["annotate"]),
        Step("stage2", stage2, ["stage2/student.safetensors"], ["stage1", "annotate"]),
        Step("decode", lambda: decoding.run_decode(bids, out, cfg, log=log, windows=windows()),
             ["predictions.jsonl", "controls/shuffled.jsonl", "controls/prompt_only.jsonl",
              "controls/ridge.jsonl"], ["stage2", "annotate"]),
        Step("evaluate", lambda: decoding.run_evaluate(out, cfg, log), ["metrics.json"],
             ["decode"], reads_dataset=False),
        Step("report", lambda: build_report(out, dataset_root=bids), ["report.html"],
             ["evaluate"], reads_dataset=False),
        # the decoder as a shareable folder (fmri2text.Decoder.from_pretrained(RUN/model))
        Step("export", lambda: export_run_model(out, cfg), ["model/config.json"],
             ["prepare", "teacher", "stage2", "evaluate"], reads_dataset=False),
    ]
    plan = [step for step in plan if step is not None]
    for i, step in enumerate(plan, 1):
        if step.name == "annotate":  # its files are named by the teacher's hash
            digest = json.loads((out / "teacher" / "teacher.json").read_text())["checkpoint_hash"]
            step.outputs = [a.format(h=digest) for a in ann]
        runner.run_step(step, i, len(plan))
    if not runner.ran:
        log("nothing to do: every step is up to date")
    else:
        log(f"run: {len(runner.ran)} step(s) run, {len(runner.skipped)} skipped, "
            f"{time.perf_counter() - t_all:.1f} s")
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    return RunResult(runner.ran, runner.skipped, out / "metrics.json", out / "report.html",
                     out / "model", format_table(metrics))


def _quiet(log: Log) -> Log:
    """Pass through a step's messages except per-batch chatter."""
    def inner(message: str) -> None:
        if not message.startswith(("annotated ", "prepare: sub-")):
            log(message)
    return inner
