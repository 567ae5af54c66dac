"""``fmri2text train stage1|stage2|mbm``: the training recipes on the command line.

Mounted by the main CLI as ``fmri2text train``. Also runnable as a module, which is how
several processes are started::

    torchrun --standalone --nproc_per_node 2 -m fmri2text.training.cli_train stage1 --bids B --run R
    accelerate launch --config_file configs/accelerate/ddp.yaml -m fmri2text.training.cli_train stage2 …
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from fmri2text.errors import UserError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

train_app = typer.Typer(name="train", help="Stage I alignment and Stage II instruction tuning.",
                        no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console()

BIDS_OPT = typer.Option(..., "--bids", help="Root of the BIDS dataset (holding sub-*/).")
RUN_OPT = typer.Option(..., "--run", help="Run directory (teacher annotations in, stageN/ out).")
CONFIG_OPT = typer.Option(None, "--config", "-c", help="YAML config file (see configs/).")
RESUME_OPT = typer.Option(False, "--resume", help="Continue from the latest checkpoint.")
PROGRESS_OPT = typer.Option(True, "--progress/--no-progress", help="Show a progress bar.")
OVERRIDES_ARG = typer.Argument(None, help="Config overrides as key=value, e.g. stage1.steps=200.")


def _log(message: str) -> None:
    console.print(escape(message), highlight=False)


def _summary(title: str, pairs: list[tuple[str, object]]) -> None:
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for k, v in pairs:
        table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    console.print(table)


@train_app.command()
def stage1(bids: Path = BIDS_OPT, run: Path = RUN_OPT, config: Optional[Path] = CONFIG_OPT,
           resume: bool = RESUME_OPT, progress: bool = PROGRESS_OPT,
           overrides: Optional[list[str]] = OVERRIDES_ARG) -> None:
    """Align the student's fMRI tokens with the teacher's video tokens (β·CLIP + (1−β)·L2L1)."""
    from fmri2text.config import load_config
    from fmri2text.training.stage1 import train_stage1

    cfg = load_config(config, overrides or [])
    m = train_stage1(bids, run, cfg, resume=resume, log=_log, progress=progress)
    if not m.get("completed"):
        raise typer.Exit(code=130)
    before, after = m.get("retrieval_before") or {}, m.get("retrieval_after") or {}
    _summary("Stage I", [("steps", m["steps_done"]), ("seconds", m["seconds"]),
                         ("samples/s", m["samples_per_second"]),
                         ("held-out top-1 before", before.get("top1", "n/a")),
                         ("held-out top-1 after", after.get("top1", "n/a")),
                         ("chance top-1", after.get("chance_top1", "n/a")),
                         ("metrics", str(Path(run) / "stage1" / "metrics.json"))])


@train_app.command()
def stage2(bids: Path = BIDS_OPT, run: Path = RUN_OPT, config: Optional[Path] = CONFIG_OPT,
           resume: bool = RESUME_OPT, progress: bool = PROGRESS_OPT,
           overrides: Optional[list[str]] = OVERRIDES_ARG) -> None:
    """Instruction-tune the bridge through the frozen LLM (λ·CE + (1−λ)·DANCE)."""
    from fmri2text.config import load_config
    from fmri2text.training.stage2 import train_stage2

    cfg = load_config(config, overrides or [])
    m = train_stage2(bids, run, cfg, resume=resume, log=_log, progress=progress)
    main = m[m["main"]]
    if not main.get("completed"):
        raise typer.Exit(code=130)
    pairs = [("variant", m["main"]), ("steps", main["steps_done"]), ("seconds", main["seconds"]),
             ("held-out CE before", main.get("heldout_ce_before", "n/a")),
             ("held-out CE after", main.get("heldout_ce_after", "n/a"))]
    for part, eff in (m.get("da_effect") or {}).items():
        pairs += [(f"DA effect on {part}: probe entropy", eff["probe_entropy"]),
                  (f"DA effect on {part}: A-distance", eff["a_distance"])]
    pairs.append(("metrics", str(Path(run) / "stage2" / "metrics.json")))
    _summary("Stage II", pairs)


@train_app.command()
def mbm(corpus: Path = typer.Option(..., "--corpus", help="A corpus built by `fmri2text corpus "
                                                          "build` (manifest.json, shards/)."),
        run: Path = typer.Option(..., "--run", help="Run directory (writes RUN/mbm/)."),
        config: Optional[Path] = CONFIG_OPT, resume: bool = RESUME_OPT,
        progress: bool = PROGRESS_OPT, overrides: Optional[list[str]] = OVERRIDES_ARG) -> None:
    """Masked brain modeling streamed from a corpus; its encoder starts Stage I with
    stage1.mbm_checkpoint=auto (or the file's path)."""
    from fmri2text.config import load_config
    from fmri2text.data.shards import read_manifest
    from fmri2text.io import ensure_output_dir
    from fmri2text.training.mbm import pretrain_mbm_corpus

    cfg = load_config(config, overrides or [])
    read_manifest(corpus)  # a missing or unfinished corpus is refused before RUN is made
    out = ensure_output_dir(Path(run), what="run directory") / "mbm"
    m = pretrain_mbm_corpus(corpus, cfg, out, resume=resume, log=_log, progress=progress)
    if not m.get("completed"):
        raise typer.Exit(code=130)
    if "final" in m:
        _summary("MBM from a corpus", [
            ("steps", m["steps_done"]), ("seconds", m["seconds"]),
            ("processes", m["num_processes"]),
            ("held-out masked MSE", m["final"]["val_mse_model"]),
            ("mean-predictor MSE", m["final"]["val_mse_mean"]),
            ("encoder", str(out / "mbm.safetensors"))])


def main(argv: list[str] | None = None) -> None:
    """Run ``train_app``; a :class:`UserError` prints one message and exits with code 2."""
    try:
        train_app(args=argv, prog_name="fmri2text train")
    except UserError as err:
        Console(stderr=True).print(f"[bold red]error:[/bold red] {escape(str(err))}",
                                   highlight=False, soft_wrap=True)
        sys.exit(UserError.exit_code)


if __name__ == "__main__":
    main()
