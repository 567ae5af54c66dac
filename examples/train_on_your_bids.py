"""Train a decoder on your own BIDS dataset with a config; it lands in RUN/model/.

Run it as a script, or cell by cell (``# %%`` cells: VS Code, PyCharm, Jupytext)::

    python examples/train_on_your_bids.py --bids /data/ds004488 --config configs/had.yaml --out runs/had
    python examples/train_on_your_bids.py --tiny --out /tmp/fmri2text-example

``--tiny`` needs no data and no download: it simulates a small BIDS dataset, stands a random
2-layer LLaMA in for the frozen LLM (unless ``teacher.llm=FOLDER`` is given) and uses
``configs/tiny.yaml``, so the whole pipeline runs in a minute or two on a laptop CPU (CI runs
it this way). Then decode with
``examples/decode_a_run.py --model OUT/run/model``.
"""

# %% Settings: pass them on the command line, or edit the defaults here in a notebook
import argparse
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--bids", type=Path, help="root of your BIDS dataset (holding sub-*/)")
parser.add_argument("--config", type=Path, help="YAML config, e.g. configs/had.yaml")
parser.add_argument("--out", type=Path, default=Path("runs/my-dataset"), help="output folder")
parser.add_argument("--tiny", action="store_true", help="simulated data, tiny models (CI)")
parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. stage2.steps=100")
args, _ = parser.parse_known_args()  # known args only: notebook kernels add their own

# %% The config: typed defaults, then the YAML file, then key=value overrides
from fmri2text.config import load_config
from fmri2text.pipeline import run_simulate

overrides = list(args.overrides)
config_file = args.config
bids = args.bids
if args.tiny:
    config_file = config_file or Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    if not any(o.startswith("teacher.llm=") for o in overrides):
        from fmri2text.models.zoo import tiny_llm

        llm_folder = args.out / "tiny-llm"  # a random LLaMA saved as a local model folder
        if not (llm_folder / "config.json").is_file():
            model, tokenizer = tiny_llm(hidden=64, layers=2)
            model.save_pretrained(llm_folder)
            tokenizer.save_pretrained(llm_folder)
        overrides.append(f"teacher.llm={llm_folder}")
cfg = load_config(config_file, overrides)
if args.tiny and bids is None:
    # stands in for "your" dataset: a BIDS folder in HAD's layout, with captioned web clips
    # to pretrain the teacher on (with a real dataset, set pipeline.teacher_checkpoint instead)
    bids = run_simulate(args.out / "bids", cfg, log=print, reuse=True)
if bids is None:
    parser.error("give --bids DATASET (or --tiny)")

# %% Train and evaluate: prepare → teacher → annotate → MBM → Stage I → Stage II → decode
# → evaluate → report. A rerun skips every step whose inputs and config are unchanged.
from fmri2text.pipeline import run_pipeline

run = args.out / "run"
result = run_pipeline(bids, run, cfg, log=print)
print(result.table)  # per held-out subject, beside the controls

# %% Export the final decoder: config.json, student.safetensors, mask.npy and a model card
# (fmri2text run exports it as well; exporting again rewrites the same files)
from fmri2text.export import export_run_model

model_dir = export_run_model(run, cfg)
print(f"decoder: {model_dir}")
print(f"model card: {model_dir / 'README.md'}")
print(f"report: {result.report_path}")
