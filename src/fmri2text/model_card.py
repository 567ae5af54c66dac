"""The model card (``README.md``) of an exported decoder: what it is, what it was trained on,
how well it decodes beside its controls, and how to use it.

The metrics table is the one ``fmri2text evaluate`` prints
(:func:`fmri2text.evaluation.evaluate.format_table`), read from the run's ``metrics.json``;
the split summary comes from the prepared trial table (``RUN/prepared/trials.tsv``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from fmri2text.models.student import deep_gain_text


def _usage(config: dict) -> str:
    data, width = config["preprocessing"]["data"], config["student"]["d_llm"]
    align = ("" if not config["student"]["encoder"].get("align_subjects") else
             "\nA new subject is first aligned to the training subjects by unlabelled trials of its "
             "own\n(CORAL): pass `adapt=decoder.windows(other_bold, events=other_events).data` to "
             "`decode`\nand `embed`, as the held-out subjects were aligned by their adapt trials.\n")
    return f"""## Use

```python
from fmri2text import Decoder

decoder = Decoder.from_pretrained("path/to/this/folder")
bold, events = "sub-XX_..._run-01_bold.nii.gz", "sub-XX_..._run-01_events.tsv"
texts = decoder.decode(bold, events=events)  # one text per trial
vectors = decoder.embed(bold, events=events)  # (trials, {width}) fMRI embeddings, for retrieval
```

Default instruction: "{config['generation']['instruction']}". A run must be on the training
data's grid ({_grid(config)}); it is preprocessed exactly as in training: drift removal
below {data['high_pass']} Hz, z-scoring within the run, a window of {data['window']} volumes
from onset + {data['hrf_delay']} s.
{align}"""


def _grid(config: dict) -> str:
    p = config["preprocessing"]
    if p["grid"] is None:
        return f"{p['n_grid']} grayordinates, {p['n_features']} used"
    return f"volume {'x'.join(map(str, p['grid']))}, {p['n_features']} voxels in the mask"


def _model(config: dict) -> str:
    s, llm, teacher, gen = config["student"], config["llm"], config["teacher"], config["generation"]
    deep = deep_gain_text(float(gen.get("deep_gain", 1.0)))
    spec, enc, tcfg = s["spec"], s["encoder"], teacher.get("config", {})
    adaptors = (f"with nonlinear\n  low-rank adaptors (rank {enc['adapter_rank']})" if enc["adapter_rank"]
                else "frozen, without\n  adaptors")
    return f"""## Model

- format: `{config['format']}` version {config['format_version']} (fmri2text
  {config['fmri2text_version']})
- student: 3D CNN tokenizer (channels {spec['tokenizer_channels']}) → SC-MBM ViT encoder
  (width {spec['embed_dim']}, depth {spec['depth']}, {spec['num_heads']} heads) {adaptors} → projector to {s['n_tokens']} tokens of width
  {s['d_llm']}; input windows of shape {tuple(s['input_shape'])}
- frozen LLM: `{llm['name']}` (sha256 `{llm.get('sha256', 'not recorded')}`, dtype
  {llm.get('dtype', 'auto')})
- teacher: Video-LLaMA `{tcfg.get('preset', '?')}` (checkpoint hash
  `{teacher.get('checkpoint_hash', '?')}`, vision `{tcfg.get('vision', '?')}`,
  {tcfg.get('video_queries', '?')} video tokens)
- generation: {'greedy' if gen['greedy'] else 'sampled (seeded)'}, at most
  {gen['max_new_tokens']} new tokens{'; tokens ' if deep else ''}{deep}
"""


def usage_card(config: dict) -> str:
    """A model card from ``config.json`` alone (a decoder saved outside a run)."""
    return (f"# fmri2text decoder\n\nAn fMRI → text decoder (fmri2text). No evaluation was "
            f"recorded with this folder.\n\n{_usage(config)}\n{_model(config)}")


def _dataset_root(trials: pd.DataFrame) -> str:
    """The deepest folder holding every run's BOLD and events file."""
    files = [str(f) for c in ("bold_path", "events_path") if c in trials.columns
             for f in trials[c].dropna().unique()]
    return os.path.commonpath(files) if files else "?"


def split_summary(trials: pd.DataFrame) -> str:
    """A markdown table: per subject, its role, runs and trials per split."""
    lines = ["| subject | role | runs | train | adapt | test |", "|---|---|---|---|---|---|"]
    for sub, rows in trials.groupby("subject", sort=True):
        counts = rows["split"].value_counts()
        role = "train" if counts.get("train", 0) else "held out"
        n_runs = rows[["session", "task", "run"]].drop_duplicates().shape[0] \
            if {"session", "task", "run"} <= set(rows.columns) else rows["run"].nunique()
        lines.append(f"| sub-{sub} | {role} | {n_runs} | {counts.get('train', 0)} | "
                     f"{counts.get('adapt', 0)} | {counts.get('test', 0)} |")
    return "\n".join(lines)


def run_card(run: Path, config: dict, metrics: dict) -> str:
    """The model card of a run's decoder: training data, splits, metrics with controls,
    permutation p-values and the scorer's identity (from ``metrics.json``).

    ``config`` is the decoder's ``config.json`` content, with its ``training`` section.
    """
    from fmri2text.data.store import read_trials
    from fmri2text.evaluation.evaluate import format_table

    trials = read_trials(Path(run) / "prepared" / "trials.tsv")
    heldout = config["training"]["heldout_subjects"]
    n_train = trials.loc[trials["split"] == "train", "subject"].nunique()
    pvals = metrics.get("p_values", {})
    tables = format_table(metrics)
    if metrics.get("vs_truth"):
        tables += "\n" + format_table(metrics, "vs_truth")
    examples = "\n".join(f"- sub-{r['subject']}: `{Path(r['bold']).name}` with "
                         f"`{Path(r['events']).name}`" for r in config["training"]["test_runs"][:3])
    return f"""# fmri2text decoder

Decodes what a person saw in a video from their fMRI, as text, through a frozen LLM
(LLM-based cross-subject semantic decoding, fmri2text). Trained on {n_train} subject(s),
evaluated on {len(heldout)} held-out subject(s) ({', '.join(f'sub-{s}' for s in heldout)}),
whose fMRI it never saw labelled: only their unlabeled "adapt" trials were used, for domain
adaptation.

{_usage(config)}
## Training data

- dataset: `{_dataset_root(trials)}`
  ({len(trials)} trials; {_grid(config)})
- held-out subjects' trials split by stimulus group into adapt (unlabeled DA) and test
  (evaluation only); no test stimulus was in any training input (checked in code)

{split_summary(trials)}

Test runs it was evaluated on (e.g.):
{examples or '- none'}

## Evaluation

Against {metrics.get('reference', '?')} ({metrics.get('n_test_trials', '?')} test trials);
controls: shuffled fMRI (fMRI permuted across test trials), prompt-only (the LLM's prior
without fMRI); linear peers: ridge (ridge fMRI → sentence embedding, nearest training answer)
and ridge_tokens (ridge fMRI → the teacher's video tokens, decoded by the same frozen LLM).
A decoder that does not beat its controls has decoded nothing.

```
{tables.rstrip()}
```

Permutation p-values (real decoder vs shuffled pairings):
{', '.join(f'{k} {v:.4g}' for k, v in pvals.items()) or 'not computed'}

Scorer (scores from different scorers are not comparable):

```json
{json.dumps(metrics.get('scorer', {}), indent=2)}
```

{_model(config)}"""
