"""``fmri2text report``: one self-contained HTML file of a run's results.

Reads a run directory (``metrics.json`` by the DESIGN §5 contract, ``predictions.jsonl``,
and when present ``config.yaml``, ``stage1/log.jsonl``, ``stage2/log.jsonl``,
``brain_map.nii.gz``) and writes ``report.html``: summary, per-subject tables with the
controls, metric bars, retrieval, training curves, sample cards with the clip's frames,
and the brain map. Every image is a ``data:`` URI and the page has no script, stylesheet
or font from elsewhere, so it opens offline. All text goes through Jinja2 autoescaping.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

from jinja2 import Environment, StrictUndefined

from fmri2text.errors import UserError
from fmri2text.io import write_text
from fmri2text.report import plots

#: Table columns: (group, sub-header, key), in the order of the paper's Tables 1–2.
COLUMNS = [
    ("BERTScore", "P", "bertscore_p"), ("BERTScore", "R", "bertscore_r"),
    ("BERTScore", "F1", "bertscore_f1"), ("BLEU", "1", "bleu1"), ("BLEU", "2", "bleu2"),
    ("ROUGE-L", "P", "rougeL_p"), ("ROUGE-L", "R", "rougeL_r"), ("ROUGE-L", "F", "rougeL_f"),
    ("Retrieval", "top-1", "top1"), ("Retrieval", "top-5", "top5"), ("Retrieval", "2-way", "twoway"),
]
TEXT_KEYS = tuple(k for g, _, k in COLUMNS if g != "Retrieval")
#: Headline metrics of the summary, (title, key).
HEADLINE = [("BERTScore-F1", "bertscore_f1"), ("BLEU-1", "bleu1"), ("BLEU-2", "bleu2"),
            ("ROUGE-L F", "rougeL_f")]
BAR_METRICS = [(f"{g} {s}", k) for g, s, k in COLUMNS if g != "Retrieval"]
CONTROL_TITLES = {"shuffled": "shuffled fMRI", "prompt_only": "prompt only (LLM prior)",
                  "ridge": "ridge baseline (nearest training answer)",
                  "ridge_tokens": "ridge to video tokens (same LLM)"}
METRICS_FIX = ("run `fmri2text evaluate` in this run directory first, or pass the run directory "
               "that holds a metrics.json written by it")
TEMPLATE = "report.html.j2"


# ----------------------------------------------------------------------------- reading inputs


def load_metrics(path: Path) -> dict:
    """Read and check ``metrics.json``: an object with ``subjects`` and ``total`` METRICS.

    Raises
    ------
    UserError
        Naming the file when it is missing, not JSON, or does not follow the contract.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError("metrics.json not found", path=path, fix=METRICS_FIX)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"not valid JSON ({err})", path=path, fix=METRICS_FIX) from None
    if not isinstance(data, dict):
        raise UserError(f"must hold a JSON object, got {type(data).__name__}", path=path, fix=METRICS_FIX)
    for key in ("subjects", "total"):
        if not isinstance(data.get(key), dict):
            raise UserError(f"lacks the object '{key}' (required keys: subjects, total; optional: "
                            "scorer, reference, decoder, controls, p_values, n_test_trials, "
                            "vs_truth, retrieval, timings_s)", path=path, fix=METRICS_FIX)
    _check_metrics(data["total"], "total", path)
    for subject, m in data["subjects"].items():
        _check_metrics(m, f"subjects.{subject}", path)
    for section in ("controls", "p_values", "vs_truth", "controls_subjects", "retrieval", "scorer",
                    "timings_s"):
        if data.get(section) is not None and not isinstance(data[section], dict):
            raise UserError(f"'{section}' must be an object, got {type(data[section]).__name__}",
                            path=path, fix=METRICS_FIX)
    for name, m in (data.get("controls") or {}).items():
        _check_metrics(m, f"controls.{name}", path)
    vs_truth = data.get("vs_truth") or {}
    for subject, m in (vs_truth.get("subjects") or {}).items():
        _check_metrics(m, f"vs_truth.subjects.{subject}", path)
    return data


def _check_metrics(m: Any, where: str, path: Path) -> None:
    if not isinstance(m, dict):
        raise UserError(f"'{where}' must be an object of metrics, got {type(m).__name__}",
                        path=path, fix=METRICS_FIX)
    for key in TEXT_KEYS + ("top1", "top5", "twoway"):
        value = m.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise UserError(f"'{where}.{key}' must be a number, got {value!r}", path=path,
                            fix=METRICS_FIX)


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON-lines file (blank lines skipped); UserError naming the bad line."""
    rows = []
    for line, text in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"line {line} is not valid JSON ({err.msg})", path=path,
                            fix="rewrite the file with one JSON object per line, or delete it") from None
        if not isinstance(row, dict):
            raise UserError(f"line {line} is not a JSON object", path=path,
                            fix="rewrite the file with one JSON object per line, or delete it")
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- formatting


def fmt(value: Any, digits: int = 2) -> str:
    """A number with ``digits`` decimals; '–' for missing or non-finite values."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "–"
    return f"{value:.{digits}f}"


def fmt_p(value: Any) -> str:
    """A p-value: 3 significant digits, '–' when missing."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "–"
    return f"{value:.3g}" if value >= 1e-4 else f"{value:.1e}"


def _scalar(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _columns(sections: list[dict]) -> list[tuple[str, str, str]]:
    """The columns of COLUMNS that any of the given METRICS has."""
    return [c for c in COLUMNS if any(isinstance(m, dict) and m.get(c[2]) is not None
                                      for m in sections)]


def metrics_table(src: dict, table_id: str, caption: str) -> dict:
    """Template data of a per-subject table (paper Tables 1–2) with control rows.

    Each subject row is followed by that subject's control rows when per-subject controls
    exist (``controls_subjects`` or ``controls_by_subject``); the Total row is followed by
    the controls' totals. A control cell is flagged when the control beats the decoder; a
    control row's p is the paired test's p that the decoder beats it (``paired``).
    """
    subjects = src.get("subjects") or {}
    total = src.get("total") or {}
    controls = src.get("controls") or {}
    per_ctl = src.get("controls_subjects") or src.get("controls_by_subject") or {}
    per_p = ((src.get("permutation") or {}).get("subjects")) or {}
    p_total = src.get("p_values") or {}
    def paired_p(name: str, subject: str | None) -> Any:  # decoder beats control `name`
        path = ("paired", "controls", name) + (("total",) if subject is None else
                                               ("subjects", subject)) + ("bertscore_f1", "p")
        node: Any = src
        for key in path:  # metrics.json is read as given: any level may be missing or odd
            node = node.get(key) if isinstance(node, dict) else None
        return node

    cols = _columns([total, *subjects.values(), *controls.values()])
    groups: list[list] = []
    for g, _, _ in cols:
        if groups and groups[-1][0] == g:
            groups[-1][1] += 1
        else:
            groups.append([g, 1])

    def row(label: str, kind: str, m: dict, ref: dict | None = None, p: Any = None) -> dict:
        cells = []
        for _, _, key in cols:
            v, r = m.get(key), (ref or {}).get(key)
            beats = (ref is not None and isinstance(v, (int, float)) and isinstance(r, (int, float))
                     and v >= r)
            cells.append({"text": fmt(v), "flag": beats})
        n = m.get("n_trials")
        shown = fmt_p(p) if p is not None or not kind.startswith("control") else ""
        return {"label": label, "kind": kind, "cells": cells, "p": shown,
                "n": str(n) if isinstance(n, int) else ""}

    rows = []
    for subject, m in subjects.items():
        rows.append(row(subject, "subject", m, p=(per_p.get(subject) or {}).get("bertscore_f1")))
        for name, by_subject in per_ctl.items():
            if isinstance(by_subject, dict) and isinstance(by_subject.get(subject), dict):
                rows.append(row(CONTROL_TITLES.get(name, name), "control", by_subject[subject], m,
                                p=paired_p(name, subject)))
    rows.append(row("Total", "total", total, p=p_total.get("bertscore_f1")))
    for name, m in controls.items():
        rows.append(row(CONTROL_TITLES.get(name, name), "control total", m, total,
                        p=paired_p(name, None)))
    return {"id": table_id, "caption": caption, "groups": groups,
            "subheads": [s for _, s, _ in cols], "rows": rows,
            "has_p": bool(per_p or p_total)}


def headline(data: dict) -> dict:
    """Template data of the summary's headline table: decoder vs each control, with p."""
    total, controls, p = data["total"], data.get("controls") or {}, data.get("p_values") or {}
    keys = [(t, k) for t, k in HEADLINE if total.get(k) is not None]
    if total.get("top1") is not None:
        keys += [("top-1", "top1"), ("2-way", "twoway")]
    rows = []
    for title, key in keys:
        v = total.get(key)
        ctl = [controls[c].get(key) for c in controls]
        scored = [(c, x) for c, x in zip(controls, ctl) if isinstance(x, (int, float))]
        above = [c for c, x in scored if x >= v]
        chance = total.get(f"{key}_chance")
        if above:
            ok, verdict = False, "not above " + ", ".join(CONTROL_TITLES.get(c, c) for c in above)
        elif scored:
            ok, verdict = True, "above every control"
        elif isinstance(chance, (int, float)):
            ok, verdict = v > chance, ("above" if v > chance else "not above") + f" chance ({fmt(chance)})"
        else:
            ok, verdict = False, "no control scored"
        rows.append({"metric": title, "value": fmt(v), "controls": [fmt(x) for x in ctl],
                     "p": fmt_p(p.get(key)), "ok": ok, "verdict": verdict})
    return {"controls": [CONTROL_TITLES.get(c, c) for c in controls], "rows": rows}


def retrieval_rows(data: dict) -> dict[str, dict]:
    """label → retrieval scores and chance levels, from METRICS or a top-level ``retrieval``."""
    keys = ("top1", "top5", "twoway")
    out = {s: m for s, m in data["subjects"].items() if any(k in m for k in keys)}
    if any(k in data["total"] for k in keys):
        out["Total"] = data["total"]
    if out:
        return out
    extra = data.get("retrieval") or {}
    for s, m in (extra.get("subjects") or {}).items():
        if isinstance(m, dict):
            out[s] = m
    if any(k in extra for k in keys):
        out["Total"] = extra
    return out


# ----------------------------------------------------------------------------- samples


def pick_samples(rows: list[dict], n: int) -> list[dict]:
    """Up to ``n`` prediction rows, taken in turn from each subject (file order within one)."""
    by_subject: dict[str, list[dict]] = {}
    for r in rows:
        by_subject.setdefault(str(r.get("subject")), []).append(r)
    out, depth = [], 0
    while len(out) < n and any(depth < len(v) for v in by_subject.values()):
        for v in by_subject.values():
            if depth < len(v) and len(out) < n:
                out.append(v[depth])
        depth += 1
    return out


def resolve_stim(stim: Any, roots: list[Path]) -> Path | None:
    """The clip file of ``stim`` under ``<root>/stimuli`` or ``<root>`` (never outside a root)."""
    if not isinstance(stim, str) or not stim or stim == "n/a":
        return None
    for root in roots:
        for base in (root / "stimuli", root):
            candidate = (base / stim).resolve()
            if candidate.is_relative_to(base.resolve()) and candidate.is_file():
                return candidate
    return None


def sample_card(row: dict, roots: list[Path], n_frames: int = 4) -> dict:
    """Template data of one sample card: frame strip (or why not), texts, trial identity."""
    clip = resolve_stim(row.get("stim"), roots)
    strip, note = None, ""
    if clip is None:
        note = "clip not found under " + " or ".join(str(r / "stimuli") for r in roots)
    else:
        try:
            strip = plots.frame_strip(plots.read_clip_frames(clip, n_frames=n_frames))
        except UserError as err:
            note = f"clip could not be decoded: {err.message}"
    truth = row.get("truth")
    truth = [str(t) for t in truth] if isinstance(truth, list) else ([str(truth)] if truth else [])
    onset = row.get("onset")
    return {"subject": str(row.get("subject", "?")), "run": _scalar(row.get("run", "?")),
            "onset": fmt(onset, 1) if isinstance(onset, (int, float)) else _scalar(onset),
            "stim": str(row.get("stim", "")), "strip": strip, "note": note,
            "instruction": str(row.get("instruction") or ""),
            "video2text": row.get("video2text"), "fmri2text": str(row.get("fmri2text") or ""),
            "truth": truth}


# ----------------------------------------------------------------------------- build


def build_report(run_dir: Path, out: Path | None = None, dataset_root: Path | None = None,
                 n_samples: int = 8) -> Path:
    """Write the run's self-contained HTML report and return its path.

    Parameters
    ----------
    run_dir:
        Run directory holding ``metrics.json`` (required), ``predictions.jsonl`` and
        optionally ``config.yaml``, ``stage1/log.jsonl``, ``stage2/log.jsonl``,
        ``brain_map.nii.gz``.
    out:
        Output file; default ``run_dir/report.html``. Written atomically.
    dataset_root:
        BIDS root whose ``stimuli/`` holds the clips of the sample cards; default
        ``run_dir/bids``.
    n_samples:
        Number of sample cards (spread over the held-out subjects).

    Raises
    ------
    UserError
        When metrics.json is missing or malformed, or another present input is malformed.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError("run directory not found", path=run_dir,
                        fix="pass the folder that `fmri2text run` or `evaluate` wrote")
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 0:
        raise UserError(f"n_samples must be a whole number ≥ 0, got {n_samples!r}",
                        fix="pass e.g. n_samples=8")
    out = Path(out) if out is not None else run_dir / "report.html"
    data = load_metrics(run_dir / "metrics.json")
    roots = [Path(dataset_root)] if dataset_root is not None else [run_dir / "bids"]

    reference = str(data.get("reference") or "video2text")
    ref_title = {"video2text": "Video2Text (the teacher's answer)",
                 "truth": "true captions"}.get(reference, reference)
    n_test = data.get("n_test_trials")
    tables = [metrics_table(data, "table-reference", f"fMRI2Text vs {ref_title} (%)")]
    vs_truth = data.get("vs_truth") or {}
    if isinstance(vs_truth.get("subjects"), dict) and isinstance(vs_truth.get("total"), dict) \
            and reference != "truth":
        tables.append(metrics_table(vs_truth, "table-truth", "fMRI2Text vs true captions (%)"))

    rows = {**data["subjects"], "Total": data["total"]}
    bars = [("vs " + ref_title, plots.metric_bars(rows, data.get("controls") or {}, BAR_METRICS))]
    if len(tables) > 1:
        bars.append(("vs true captions", plots.metric_bars(
            {**vs_truth["subjects"], "Total": vs_truth["total"]}, vs_truth.get("controls") or {},
            BAR_METRICS)))
    ret_rows = retrieval_rows(data)

    logs = {}
    for stage, title in (("stage1", "Stage I (contrastive + L2/L1 alignment)"),
                         ("stage2", "Stage II (LLM cross-entropy + domain adaptation)")):
        log = run_dir / stage / "log.jsonl"
        logs[title] = read_jsonl(log) if log.is_file() else []

    pred_path = run_dir / "predictions.jsonl"
    if pred_path.is_file():
        from fmri2text.evaluation.evaluate import read_predictions

        cards = [sample_card(r, roots) for r in pick_samples(read_predictions(pred_path), n_samples)]
    else:
        cards = None

    brain_path = run_dir / "brain_map.nii.gz"
    brain = plots.brain_map_figures(brain_path) if brain_path.is_file() else []

    config_path = run_dir / "config.yaml"
    context = {
        "title": f"fmri2text report — {run_dir.resolve().name}",
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "run_dir": str(run_dir.resolve()),
        "decoder": str(data.get("decoder") or "fMRI2Text"),
        "reference": ref_title,
        "n_test": str(n_test) if n_test is not None else "–",
        "subjects": list(data["subjects"]),
        "scorer": [(str(k), _scalar(v)) for k, v in (data.get("scorer") or {}).items()],
        "headline": headline(data),
        "permutation": _permutation_note(data),
        "timings": [(str(k), fmt(v, 1)) for k, v in (data.get("timings_s") or {}).items()],
        "config_text": config_path.read_text(encoding="utf-8", errors="replace")[:50_000]
        if config_path.is_file() else None,
        "tables": tables,
        "bars": [(t, uri) for t, uri in bars if uri],
        "retrieval_plot": plots.retrieval_bars(ret_rows) if ret_rows else None,
        "retrieval_rows": [{"label": s, "n": str(m.get("n_candidates", "")),
                            "cells": [(fmt(m.get(k)), fmt(m.get(f"{k}_chance")))
                                      for k in ("top1", "top5", "twoway")]}
                           for s, m in ret_rows.items()],
        "training_plot": plots.training_curves(logs),
        "training_missing": [t for t, rows_ in logs.items() if not rows_],
        "samples": cards,
        "brain": brain,
        **health_context(data),
    }
    html = render(context)
    write_text(out, html)
    return out


def health_context(data: dict) -> dict:
    """The report's banner and facts on the targets' and the outputs' health."""
    th = data.get("teacher_health") if isinstance(data.get("teacher_health"), dict) else {}
    problems = [str(p) for p in th.get("problems") or []] if th.get("degenerate") else []
    oh = (data.get("output_health") or {}).get("fmri2text") or {}
    rows = []
    for label, m in [*sorted((oh.get("subjects") or {}).items()), ("Total", oh.get("total"))]:
        if isinstance(m, dict):
            rows.append((str(label), f"{m.get('distinct', '–')}/{m.get('n', '–')} distinct "
                         f"({fmt(100 * m['distinct_fraction']) if 'distinct_fraction' in m else '–'} %)"
                         + (f", {fmt(100 * m['prior_share'])} % the prompt-only answer"
                            if "prior_share" in m else "")))
    decoding = data.get("decoding") if isinstance(data.get("decoding"), dict) else {}
    return {"teacher_problems": problems, "truth_source": str(data.get("truth_source") or "–"),
            "output_health": rows, "decoding": str(decoding.get("text") or "–")}


def _permutation_note(data: dict) -> str:
    perm = data.get("permutation") or {}
    n = perm.get("n_permutations")
    if not isinstance(n, int):
        return ""
    return (f"p-values: {n} permutations of the fMRI–text pairing within each subject "
            f"(p = (1 + #perm ≥ real) / (1 + n)).")


def render(context: dict) -> str:
    """Render the packaged Jinja2 template with autoescaping on."""
    source = (resources.files("fmri2text.report") / "templates" / TEMPLATE).read_text(
        encoding="utf-8")
    env = Environment(autoescape=True, undefined=StrictUndefined, trim_blocks=True,
                      lstrip_blocks=True)
    return env.from_string(source).render(**context)
