"""Decode one fMRI run with a trained decoder: one text per trial.

Run it as a script, or cell by cell (``# %%`` cells: VS Code, PyCharm, Jupytext)::

    python examples/decode_a_run.py --model runs/demo/model
    python examples/decode_a_run.py --model runs/had/run/model \\
        --bold sub-27_ses-action01_task-action_run-01_bold.nii.gz \\
        --events sub-27_ses-action01_task-action_run-01_events.tsv

Without ``--bold``, it decodes the first held-out test run the decoder was evaluated on (its
``config.json`` records them), and compares with what the run wrote in ``predictions.jsonl``.
"""

# %% Settings: pass them on the command line, or edit the defaults here in a notebook
import argparse
import json
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", type=Path, default=Path("runs/demo/model"),
                    help="a decoder folder (RUN/model of fmri2text run)")
parser.add_argument("--bold", type=Path, help="one run's BOLD image (4-D NIfTI or CIFTI)")
parser.add_argument("--events", type=Path, help="its BIDS events.tsv (the trials)")
parser.add_argument("--instruction", help="what to ask about each trial")
parser.add_argument("--adapt-bold", type=Path, help="another run of the same subject (unlabelled), "
                    "to align the subject by; default the run's own trials")
parser.add_argument("--adapt-events", type=Path, help="its events.tsv")
args, _ = parser.parse_known_args()  # known args only: notebook kernels add their own

# %% Load the decoder: reads JSON, a .npy mask and safetensors, never runs code from the folder
from fmri2text import Decoder

decoder = Decoder.from_pretrained(args.model)
print(decoder)

# %% Pick the run: yours, or the first held-out test run of the decoder's own evaluation
bold, events = args.bold, args.events
if bold is None:
    test_run = decoder.training["test_runs"][0]
    bold, events = Path(test_run["bold"]), Path(test_run["events"])
print(f"run: {bold.name}")

# %% Preprocess exactly as in training (drift removal, z-scoring, HRF-delayed windows) ...
trials = decoder.windows(bold, events=events)
print(f"{len(trials.table)} trials, windows {trials.data.shape} (trials, volumes, voxels)")

# %% A new subject is first aligned to the training subjects by unlabelled windows of its own
# (CORAL, as the run's held-out subjects were by their adapt trials): another of its runs, or
# this run's trials; for the decoder's own test run, the trials its evaluation did not score
predictions = Path(decoder.training.get("run", "")) / "predictions.jsonl"
rows = []
if args.bold is None and predictions.is_file():
    rows = [json.loads(line) for line in predictions.read_text(encoding="utf-8").splitlines()]
    rows = [r for r in rows if r["subject"] == f"sub-{test_run['subject']}"]
if args.adapt_bold is not None:
    adapt = decoder.windows(args.adapt_bold, events=args.adapt_events).data
else:
    scored = {r["onset"] for r in rows}
    adapt = decoder.windows(bold, onsets=[t for t in trials.table["onset"] if t not in scored]).data

# %% ... and decode: the student turns each window into fMRI tokens, the frozen LLM answers
texts = decoder.decode(bold, events=events, instruction=args.instruction, adapt=adapt)
for onset, stim, text in zip(trials.table["onset"], trials.table["stim_file"], texts):
    print(f"{onset:7.1f}  {text}    [{stim}]")

# %% fMRI embeddings for retrieval: (trials, LLM width), L2-normalised
vectors = decoder.embed(bold, events=events, adapt=adapt)
print(f"embeddings {vectors.shape}")

# %% The run's own predictions for the same trials, when this is one of its test runs
if rows and args.instruction is None:
    ours = {(onset, stim): text for onset, stim, text in
            zip(trials.table["onset"], trials.table["stim_file"], texts)}
    rows = [r for r in rows if (r["onset"], r["stim"]) in ours]
    same = sum(ours[(r["onset"], r["stim"])] == r["fmri2text"] for r in rows)
    print(f"{same} of {len(rows)} test trials of this run decode as in {predictions}")
