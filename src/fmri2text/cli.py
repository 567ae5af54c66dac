"""The ``fmri2text`` command line: a thin layer over the package's functions.

Every command reads and writes files; user errors print one message and exit with code 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from fmri2text import __version__, machine
from fmri2text.errors import UserError
from fmri2text.io import run_lock

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing reaches the network at run time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

app = typer.Typer(
    name="fmri2text",
    help="Decode what a person saw in a video from their fMRI, as text, with a frozen LLM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

CONFIG_OPT = typer.Option(None, "--config", "-c", help="YAML config file (see configs/).")
OVERRIDES_ARG = typer.Argument(None, help="Config overrides as key=value, e.g. data.window=3.")


def _load(config: Optional[Path], overrides: Optional[list[str]]):
    from fmri2text.config import load_config

    return load_config(config, overrides or [])


@app.command()
def simulate(
    out: Path = typer.Option(..., "--out", help="Folder to write the BIDS dataset into."),
    subjects: Optional[int] = typer.Option(None, "--subjects", min=2, help="Number of subjects."),
    runs: Optional[int] = typer.Option(None, "--runs", min=1, help="Runs per subject (HAD: 12)."),
    classes: Optional[int] = typer.Option(None, "--classes", min=2, help="Action classes (HAD: 180)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed; same seed, same bytes."),
    resolution: Optional[float] = typer.Option(None, "--resolution", min=0.5,
                                               help="Voxel size in mm (HAD: 2)."),
    cnr_scale: Optional[float] = typer.Option(None, "--cnr-scale", min=0.0,
                                              help="Multiplies HAD's contrast-to-noise ratios."),
    config: Optional[Path] = CONFIG_OPT,
    overrides: Optional[list[str]] = OVERRIDES_ARG,
) -> None:
    """Write a simulated video-fMRI BIDS dataset in HAD's layout, with ground truth."""
    from fmri2text.pipeline import run_simulate, simulation_stamp

    flags = {"subjects": subjects, "runs": runs, "classes": classes, "seed": seed,
             "resolution": resolution, "cnr_scale": cnr_scale}
    extra = [f"simulate.{k}={v}" for k, v in flags.items() if v is not None]
    cfg = _load(config, (overrides or []) + extra)
    simulation_stamp(out)  # a foreign non-empty folder is refused before the lock touches it
    with run_lock(out, "simulate"):
        path = run_simulate(out, cfg, log=console.print)
    console.print(f"dataset written to [bold]{path}[/bold]")


@app.command()
def prepare(
    bids: Path = typer.Option(..., "--bids", help="Root of the BIDS dataset (holding sub-*/)."),
    out: Path = typer.Option(..., "--out", help="Folder for trials.tsv, the store and its manifest."),
    config: Optional[Path] = CONFIG_OPT,
    overrides: Optional[list[str]] = OVERRIDES_ARG,
) -> None:
    """Read a BIDS dataset into trials.tsv and a chunked float16 store (resumes when rerun)."""
    from fmri2text.data.store import prepare as run_prepare

    cfg = _load(config, overrides)
    path = run_prepare(bids, out, cfg, log=lambda m: console.print(m, markup=False, highlight=False))
    console.print(f"prepared store in [bold]{escape(str(path))}[/bold]")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Run directory."),
    config: Optional[Path] = CONFIG_OPT,
    overrides: Optional[list[str]] = OVERRIDES_ARG,
) -> None:
    """The paper's whole pipeline on the embedded default: `fmri2text run --simulate --out OUT`."""
    from fmri2text.pipeline import run_pipeline

    cfg = _load(config, overrides)
    _check_out_dir(out)
    with run_lock(out, "demo"):
        result = run_pipeline(None, out, cfg, simulate=True, log=_log)
    _print_result(result)


@app.command()
def report(
    run: Path = typer.Option(..., "--run", help="Run directory holding metrics.json."),
    out: Optional[Path] = typer.Option(None, "--out", help="HTML file (default RUN/report.html)."),
    bids: Optional[Path] = typer.Option(None, "--bids",
                                        help="Dataset root whose stimuli/ holds the clips "
                                             "(default RUN/bids)."),
    samples: int = typer.Option(8, "--samples", min=0, help="Sample cards to show."),
) -> None:
    """Write one self-contained HTML report of a run (tables, plots, samples, brain map)."""
    from fmri2text.report.html import build_report

    if not run.is_dir():  # checked before the lock, which would create the folder
        raise UserError("run directory not found", path=run,
                        fix="pass the folder that `fmri2text demo` (or `run`) wrote")
    with run_lock(run, "report"):
        path = build_report(run, out=out, dataset_root=bids, n_samples=samples)
    console.print(f"report: [bold]{path}[/bold]")


BIDS_OPT = typer.Option(..., "--bids", help="Root of the BIDS dataset (holding sub-*/).")
RUN_OPT = typer.Option(..., "--run", help="Run directory (read and written by the step).")


def _log(message: str) -> None:
    console.print(escape(str(message)), highlight=False)


def _check_bids(bids: Path, cfg):
    """Read the dataset's trial table (headers and events only) before anything is written."""
    from fmri2text.steps import experiment_trials

    return experiment_trials(bids, cfg)


def _check_run_dir(run: Path) -> None:
    if not run.is_dir():  # checked before the lock, which would create the folder
        raise UserError("run directory not found", path=run,
                        fix="pass the folder that `fmri2text run` (or the earlier steps) wrote")


teacher_app = typer.Typer(name="teacher", help="The Video-LLaMA teacher: pretraining on web clips.",
                          no_args_is_help=True, add_completion=False,
                          pretty_exceptions_enable=False)


@teacher_app.command("fit")
def teacher_fit(bids: Path = BIDS_OPT, run: Path = RUN_OPT, config: Optional[Path] = CONFIG_OPT,
                overrides: Optional[list[str]] = OVERRIDES_ARG) -> None:
    """Pretrain the teacher on the dataset's web clips (never a test clip) into RUN/teacher/."""
    from fmri2text.steps import run_teacher_fit

    cfg = _load(config, overrides)
    _check_bids(bids, cfg)
    with run_lock(run, "teacher fit"):
        record = run_teacher_fit(bids, run, cfg, _log)
    console.print(f"teacher: [bold]{escape(str(Path(run) / 'teacher'))}[/bold] "
                  f"(hash {record['checkpoint_hash']})")


@app.command()
def annotate(bids: Path = BIDS_OPT, run: Path = RUN_OPT, config: Optional[Path] = CONFIG_OPT,
             overrides: Optional[list[str]] = OVERRIDES_ARG) -> None:
    """Video2Text + video tokens of the training clips (and, for evaluation only, the test clips)."""
    from fmri2text.steps import run_annotate

    cfg = _load(config, overrides)
    _check_bids(bids, cfg)
    with run_lock(run, "annotate"):
        s = run_annotate(bids, run, cfg, _log)
    console.print(f"annotated {s['train_clips']} training and {s['test_clips']} test clips "
                  f"({s['computed']} computed, {s['reused']} reused)")


@app.command("pretrain-mbm")
def pretrain_mbm(bids: Path = BIDS_OPT, run: Path = RUN_OPT, config: Optional[Path] = CONFIG_OPT,
                 overrides: Optional[list[str]] = OVERRIDES_ARG) -> None:
    """Masked brain modeling on unlabeled windows (training subjects + held-out adapt trials)."""
    from fmri2text.steps import run_pretrain_mbm

    cfg = _load(config, overrides)
    _check_bids(bids, cfg)
    with run_lock(run, "pretrain-mbm"):
        run_pretrain_mbm(bids, run, cfg, _log)
    console.print(f"MBM encoder: [bold]{escape(str(Path(run) / 'mbm' / 'mbm.safetensors'))}[/bold]")


@app.command()
def decode(bids: Path = BIDS_OPT, run: Path = RUN_OPT,
           instruction: Optional[str] = typer.Option(None, "--instruction",
                                                     help="Instruction to answer (default "
                                                          "evaluation.instruction)."),
           config: Optional[Path] = CONFIG_OPT,
           overrides: Optional[list[str]] = OVERRIDES_ARG) -> None:
    """Held-out test fMRI + instruction → fMRI2Text through the Stage II student and the LLM."""
    from fmri2text.decoding import run_decode
    from fmri2text.training.stage2 import check_student

    cfg = _load(config, overrides)
    _check_run_dir(run)
    check_student(run, cfg)
    _check_bids(bids, cfg)
    with run_lock(run, "decode"):
        record = run_decode(bids, run, cfg, instruction, _log)
    console.print(f"decoded {record['n_test_trials']} test trials: "
                  f"[bold]{escape(str(Path(run) / 'predictions.jsonl'))}[/bold]")


@app.command()
def evaluate(run: Path = RUN_OPT, config: Optional[Path] = CONFIG_OPT,
             overrides: Optional[list[str]] = OVERRIDES_ARG) -> None:
    """Score predictions.jsonl and controls/*.jsonl into metrics.json; print the table."""
    from fmri2text.decoding import read_run_outputs, run_evaluate
    from fmri2text.evaluation.evaluate import format_table

    cfg = _load(config, overrides)
    _check_run_dir(run)
    read_run_outputs(run)  # bad files are refused before anything is written
    with run_lock(run, "evaluate"):
        metrics = run_evaluate(run, cfg, _log)
    console.print(format_table(metrics), markup=False, highlight=False)
    console.print(f"metrics: [bold]{escape(str(Path(run) / 'metrics.json'))}[/bold]")


@app.command("run")
def run_all(bids: Optional[Path] = typer.Option(None, "--bids", help="Root of the BIDS dataset."),
            out: Path = typer.Option(..., "--out", help="Run directory."),
            simulate: bool = typer.Option(False, "--simulate",
                                          help="Simulate a dataset into OUT/bids first."),
            config: Optional[Path] = CONFIG_OPT,
            overrides: Optional[list[str]] = OVERRIDES_ARG) -> None:
    """Every step, skipping those whose inputs and config are unchanged: prepare → teacher fit
    → annotate → pretrain-mbm → stage1 → stage2 → decode → evaluate → report → export (RUN/model)."""
    from fmri2text.pipeline import run_pipeline

    cfg = _load(config, overrides)
    if (bids is None) == (not simulate):
        raise UserError("give either --bids DIR or --simulate (not both, not neither)",
                        fix="fmri2text run --bids DATASET --out RUN, or fmri2text run --simulate "
                            "--out RUN")
    _check_out_dir(out)
    if bids is not None:
        _check_bids(bids, cfg)
    with run_lock(out, "run"):
        result = run_pipeline(bids, out, cfg, simulate=simulate, log=_log)
    _print_result(result)


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError("the run directory is a file, not a folder", path=out,
                        fix="pass a folder path (it is created if missing)")


def _print_result(result) -> None:
    """The per-subject table and where the run's outputs are (run and demo)."""
    console.print(result.table, markup=False, highlight=False)
    console.print(f"metrics: [bold]{escape(str(result.metrics_path))}[/bold]")
    console.print(f"report: [bold]{escape(str(result.report_path))}[/bold]")
    console.print(f"decoder: [bold]{escape(str(result.model_path))}[/bold] "
                  "(fmri2text.Decoder.from_pretrained)")


@app.command("config")
def show_config(
    config: Optional[Path] = CONFIG_OPT,
    overrides: Optional[list[str]] = OVERRIDES_ARG,
    keys: bool = typer.Option(False, "--keys", help="List every valid key instead."),
) -> None:
    """Print the resolved config (defaults, then --config, then overrides) as YAML."""
    from fmri2text.config import dump_config, valid_keys

    if keys:
        console.print("\n".join(valid_keys()), highlight=False)
        return
    console.print(dump_config(_load(config, overrides)), highlight=False, markup=False)


@app.command("machine")
def show_machine() -> None:
    """Print this machine's compute kind and digests of the kernels the pipeline uses, as
    JSON: two machines (or two FMRI2TEXT_CPU_KERNELS settings) with the same digests
    compute alike."""
    import json

    console.print(json.dumps({"machine": machine.describe(), "digests": machine.kernel_digests()},
                             indent=1), highlight=False, markup=False)


corpus_app = typer.Typer(name="corpus", help="MBM pretraining corpora from many BIDS datasets.",
                         no_args_is_help=True, add_completion=False,
                         pretty_exceptions_enable=False)


@corpus_app.command("build")
def corpus_build(
    bids: list[Path] = typer.Option(..., "--bids", help="A BIDS dataset root (repeat for more)."),
    out: Path = typer.Option(..., "--out", help="Folder of the corpus (shards + manifest)."),
    grid: Path = typer.Option(..., "--grid", help="3-D NIfTI whose grid and nonzero voxels the "
                                                  "windows take, e.g. RUN/prepared/mask.nii.gz."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1,
                                          help="Dask worker processes (corpus.workers)."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler",
                                            help="Address of a running Dask scheduler."),
    config: Optional[Path] = CONFIG_OPT,
    overrides: Optional[list[str]] = OVERRIDES_ARG,
) -> None:
    """Windows of every BOLD run, on one grid, as checksummed Parquet shards (resumable)."""
    from fmri2text.data.corpus import CorpusGrid, build_corpus, find_runs

    flags = {"workers": workers, "scheduler": scheduler}
    cfg = _load(config, (overrides or []) + [f"corpus.{k}={v}" for k, v in flags.items()
                                              if v is not None])
    find_runs(bids)  # bad inputs are refused before the corpus folder is made
    CorpusGrid.from_image(grid)
    with run_lock(out, "corpus build"):
        m = build_corpus(bids, out, grid, cfg, log=console.print)
    console.print(f"corpus: [bold]{escape(str(out))}[/bold] ({len(m['shards'])} shards, "
                  f"{m['n_windows']} windows, {len(m['skipped'])} runs skipped)")


def _mount_subcommands() -> None:
    from fmri2text.training.cli_train import train_app

    app.add_typer(train_app, name="train")
    app.add_typer(teacher_app, name="teacher")
    app.add_typer(corpus_app, name="corpus")


_mount_subcommands()


@app.callback(invoke_without_command=True)
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
) -> None:
    if version:
        console.print(f"fmri2text {__version__}")
        raise typer.Exit()


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning :class:`UserError` into one message and exit code 2.

    Usage errors (a missing option, a value out of range) are reported by typer itself,
    also with exit code 2.
    """
    try:
        machine.kernels()  # a bad FMRI2TEXT_CPU_KERNELS stops here, before any work
        app(args=argv, prog_name="fmri2text")
    except UserError as err:
        err_console.print(f"[bold red]error:[/bold red] {escape(str(err))}", highlight=False,
                          soft_wrap=True)
        sys.exit(UserError.exit_code)


if __name__ == "__main__":
    main()
