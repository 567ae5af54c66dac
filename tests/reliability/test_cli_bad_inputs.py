"""Bad input through the real CLI: exit code 2, one message naming the file and a fix.

Two tables:

- ``BAD_CONFIGS`` × every command that takes ``--config`` (found by introspecting the typer
  app, so a new command is covered the day it lands): the config is read before anything
  is written, so the working folder must be exactly as it was (no run directory).
- ``COMMAND_CASES``: inputs specific to one command (output folder that is a file, a
  metrics.json that is truncated, ...); earlier artifacts must stay byte-identical.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import typer.main

from fmri2text.cli import app

from .conftest import assert_clear_user_error, run_cli, run_cli_batch, snapshot

MARKER = "PWNED"  # a file a malicious YAML would create if it were ever executed


def _commands_with_config() -> dict[str, list[str]]:
    """{command: option names to point at the working folder} for commands taking --config."""
    group = typer.main.get_command(app)
    out = {}
    for name, cmd in group.commands.items():
        names = {p.name for p in cmd.params}
        if "config" in names:
            out[name] = [p.opts[0] for p in cmd.params
                         if p.opts[0].startswith("--") and (p.required or p.name in ("out", "run", "bids"))]
    return out


CONFIG_COMMANDS = _commands_with_config()


@dataclass
class BadConfig:
    """A bad config: YAML text written to ``bad.yaml`` (None: no file) and/or overrides."""

    yaml: str | bytes | None
    overrides: list[str] = field(default_factory=list)
    needles: tuple[str, ...] = ()  # besides the config path when a file is given
    config_arg: str = "bad.yaml"  # what --config points at, relative to the working folder


BAD_CONFIGS = {
    "unknown_key": BadConfig("data:\n  windw: 3\n", needles=("data.windw", "data.window")),
    "unknown_section": BadConfig("dtaa:\n  window: 3\n", needles=("dtaa",)),
    "wrong_type_str_for_int": BadConfig('data: {window: "abc"}\n', needles=("data.window", "int")),
    "wrong_type_dict_for_int": BadConfig("data: {window: {a: 1}}\n", needles=("data.window",)),
    "wrong_type_bool": BadConfig("data: {standardize: maybe}\n", needles=("data.standardize",)),
    "wrong_type_list": BadConfig("baseline: {alphas: {a: 1}}\n", needles=("baseline.alphas",)),
    "python_tag_top": BadConfig(f"!!python/object/apply:os.system ['touch {MARKER}']\n",
                                needles=("YAML",)),
    "python_tag_nested": BadConfig(f"data:\n  window: !!python/object/apply:os.system ['touch {MARKER}']\n",
                                   needles=("YAML",)),
    "python_name_tag": BadConfig("seed: !!python/name:os.system\n", needles=("YAML",)),
    "top_level_list": BadConfig("- data\n- window\n", needles=("mapping",)),
    "top_level_scalar": BadConfig("hello\n", needles=("mapping",)),
    "section_is_list": BadConfig("data: [1, 2]\n", needles=("data", "mapping")),
    "section_is_scalar": BadConfig("simulate: 5\n", needles=("simulate", "mapping")),
    "syntax_error": BadConfig("data: [unclosed\n", needles=("YAML",)),
    "not_utf8": BadConfig(b"data:\n  task: \xff\xfe\n"),
    "alias_bomb": BadConfig("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\n"
                            "c: &c [*b, *b, *b, *b, *b, *b, *b, *b]\nd: [*c, *c, *c, *c, *c, *c]\n",
                            needles=("'a'",)),
    "out_of_range_yaml": BadConfig("data: {window: 0}\n", needles=("data.window",)),
    "non_finite_yaml": BadConfig("simulate: {resolution: .inf}\n", needles=("simulate.resolution",)),
    "missing_file": BadConfig(None, needles=("not found",), config_arg="nope.yaml"),
    "config_is_folder": BadConfig(None, config_arg="."),
    "override_out_of_range": BadConfig(None, ["split.adapt_fraction=1.5"], ("split.adapt_fraction",)),
    "override_negative": BadConfig(None, ["simulate.subjects=-3"], ("simulate.subjects",)),
    "override_nan": BadConfig(None, ["simulate.resolution=nan"], ("simulate.resolution",)),
    "override_wrong_type": BadConfig(None, ["data.window=abc"], ("data.window",)),
    "override_float_for_int": BadConfig(None, ["seed=1.5"], ("seed",)),
    "override_unknown_key": BadConfig(None, ["data.windw=3"], ("data.windw", "data.window")),
    "override_no_equals": BadConfig(None, ["data.window"], ("key=value",)),
    "override_empty_key": BadConfig(None, ["=3"], ("unknown config key",)),
    "override_bad_choice": BadConfig(None, ["data.space=mni"], ("data.space", "fmriprep")),
}


def _config_case(work: Path, command: str, case: BadConfig) -> tuple[list[str], list[str]]:
    """(argv, needles) of one bad config for one command, its paths inside ``work``."""
    args: list[str] = [command]
    for opt in CONFIG_COMMANDS[command]:
        args += [opt, str(work / opt.strip("-"))]  # nothing there yet: must stay so
    needles = list(case.needles)
    if case.yaml is not None or case.config_arg != "bad.yaml":
        cfg_path = work / case.config_arg
        if case.yaml is not None:
            data = case.yaml if isinstance(case.yaml, bytes) else case.yaml.encode()
            cfg_path.write_bytes(data)
        args += ["--config", str(cfg_path)]
        needles.append(str(cfg_path.resolve() if case.config_arg == "." else cfg_path))
    return args + case.overrides, needles


@pytest.fixture(scope="module")
def config_results(tmp_path_factory) -> dict:
    """Every (command, bad config) run through the CLI entry point, one subprocess in all."""
    runs = {}
    for command in sorted(CONFIG_COMMANDS):
        for name, case in BAD_CONFIGS.items():
            work = tmp_path_factory.mktemp(f"{command}-{name}")
            args, needles = _config_case(work, command, case)
            runs[(command, name)] = (args, work, needles, snapshot(work))
    results = run_cli_batch([(a, w) for a, w, _, _ in runs.values()],
                            tmp_path_factory.mktemp("batch") / "config.json")
    return {key: (r, *rest[1:]) for (key, rest), r in zip(runs.items(), results)}


@pytest.mark.parametrize("bad", list(BAD_CONFIGS), ids=list(BAD_CONFIGS))
@pytest.mark.parametrize("command", sorted(CONFIG_COMMANDS))
def test_bad_config(config_results: dict, command: str, bad: str):
    r, work, needles, before = config_results[(command, bad)]
    assert_clear_user_error(r, *needles)
    assert snapshot(work) == before, "a refused command must not write anything"
    assert not (work / MARKER).exists() and not (Path.cwd() / MARKER).exists()


@pytest.mark.parametrize("bad", ["python_tag_top", "missing_file", "override_out_of_range"])
def test_bad_config_fresh_process(tmp_path: Path, bad: str):
    """The same through ``python -m fmri2text.cli`` itself (the batch runner is faithful)."""
    args, needles = _config_case(tmp_path, "demo", BAD_CONFIGS[bad])
    before = snapshot(tmp_path)
    r = run_cli(*args, cwd=tmp_path)
    assert_clear_user_error(r, *needles)
    assert snapshot(tmp_path) == before and not (tmp_path / MARKER).exists()


def test_every_command_is_covered():
    """Commands without --config need their own rows in COMMAND_CASES."""
    group = typer.main.get_command(app)
    uncovered = set(group.commands) - set(CONFIG_COMMANDS) - {c.command for c in COMMAND_CASES}
    assert not uncovered, f"add bad-input rows for {sorted(uncovered)} to COMMAND_CASES"


# ----------------------------------------------------------------------------- per command


def _valid_metrics() -> dict:
    m = {k: 50.0 for k in ("bertscore_p", "bertscore_r", "bertscore_f1", "bleu1", "bleu2",
                           "rougeL_p", "rougeL_r", "rougeL_f")}
    return {"scorer": {"model": "minilm"}, "subjects": {"sub-01": m}, "total": m,
            "controls": {"shuffled": m}, "p_values": {"bertscore_f1": 0.5}, "n_test_trials": 1}


def _run_dir(work: Path) -> Path:
    """A finished run: metrics.json, predictions.jsonl and an earlier report.html."""
    run = work / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(_valid_metrics()))
    (run / "predictions.jsonl").write_text(json.dumps({
        "subject": "sub-01", "run": 1, "onset": 12.0, "stim": "a/b.mp4", "instruction": "Describe.",
        "video2text": None, "fmri2text": "a cat", "truth": ["a cat"]}) + "\n")
    (run / "report.html").write_text("<html>earlier report</html>")
    return run


@dataclass
class Case:
    """One malformed input of one command: ``setup(work) -> (args, needles)``, run with the
    environment variables ``env``."""

    command: str
    name: str
    setup: Callable[[Path], tuple[list[str], list[str]]]
    env: dict[str, str] = field(default_factory=dict)


def _metrics_case(content: bytes | str | None, needle: str = "metrics.json"):
    def setup(work: Path):
        run = _run_dir(work)
        if content is None:
            (run / "metrics.json").unlink()
        else:
            data = content if isinstance(content, bytes) else content.encode()
            (run / "metrics.json").write_bytes(data)
        return ["report", "--run", run], [str(run / "metrics.json"), needle]
    return setup


def _truncated_metrics(work: Path):
    run = _run_dir(work)
    text = (run / "metrics.json").read_text()
    (run / "metrics.json").write_text(text[: len(text) // 2])
    return ["report", "--run", run], [str(run / "metrics.json")]


def _bad_predictions(work: Path):
    run = _run_dir(work)
    with open(run / "predictions.jsonl", "a") as f:
        f.write('{"subject": "sub-01", "fmri2text": \n')
    return ["report", "--run", run], [str(run / "predictions.jsonl"), "line 2"]


def _out_is_file(command: str, extra: Callable[[Path], list[str]] = lambda w: []):
    def setup(work: Path):
        f = work / "a_file"
        f.write_text("precious")
        return [command, "--out", f, *extra(work)], [str(f)]
    return setup


def _out_below_file(command: str):
    def setup(work: Path):
        f = work / "a_file"
        f.write_text("precious")
        return [command, "--out", f / "sub"], [str(f)]
    return setup


def _foreign_folder(work: Path):
    d = work / "mine"
    d.mkdir()
    (d / "thesis.tex").write_text("precious")
    return ["simulate", "--out", d], [str(d), "not empty"]


def _empty_bids(work: Path):
    (work / "bids").mkdir()
    return ["prepare", "--bids", work / "bids", "--out", work / "prep"], [str(work / "bids")]


def _run_without_student(work: Path):
    run = _run_dir(work)
    (work / "bids").mkdir()
    return ["decode", "--bids", work / "bids", "--run", run], [
        str(run / "stage2" / "student.safetensors"), "stage2"]


def _predictions_missing_fields(work: Path):
    run = _run_dir(work)
    (run / "predictions.jsonl").write_text(json.dumps({"subject": "sub-01", "fmri2text": "x"}) + "\n")
    return ["evaluate", "--run", run], [str(run / "predictions.jsonl"), "video2text"]


def _control_missing_fields(work: Path):
    run = _run_dir(work)
    (run / "controls").mkdir()
    (run / "controls" / "shuffled.jsonl").write_text(json.dumps({"subject": "sub-01"}) + "\n")
    return ["evaluate", "--run", run], [str(run / "controls" / "shuffled.jsonl"), "fmri2text"]


def _corpus_bad_grid(work: Path):
    bold = work / "ds" / "sub-01" / "func" / "sub-01_task-x_bold.nii.gz"
    bold.parent.mkdir(parents=True)
    bold.write_bytes(b"")  # listed, not read: the grid is checked first
    (work / "g.nii.gz").write_text("not an image")
    return (["corpus", "build", "--bids", work / "ds", "--out", work / "c", "--grid",
             work / "g.nii.gz"], [str(work / "g.nii.gz"), "mask"])


#: Rows that fail today because of a bug in a module this suite may not edit (strict: the
#: mark must go when the bug is fixed).
KNOWN_BUGS: dict = {}  # (command, case) -> reason, for bugs found but not yet fixed

COMMAND_CASES = [
    Case("simulate", "out_is_file", _out_is_file("simulate")),
    Case("simulate", "out_below_file", _out_below_file("simulate")),
    Case("simulate", "out_not_empty_foreign", _foreign_folder),
    Case("simulate", "option_below_min", lambda w: (["simulate", "--out", w / "o", "--subjects", "1"],
                                                    ["--subjects"])),
    Case("simulate", "option_not_a_number", lambda w: (["simulate", "--out", w / "o", "--runs", "x"],
                                                       ["--runs"])),
    Case("simulate", "option_non_finite", lambda w: (["simulate", "--out", w / "o", "--resolution",
                                                      "inf"], ["simulate.resolution"])),
    Case("demo", "out_is_file", _out_is_file("demo")),
    Case("demo", "out_below_file", _out_below_file("demo")),
    Case("prepare", "bids_missing", lambda w: (["prepare", "--bids", w / "nope", "--out", w / "p"],
                                               [str(w / "nope")])),
    Case("prepare", "bids_is_file", lambda w: ((w / "f").write_text("x") and None) or (
        ["prepare", "--bids", w / "f", "--out", w / "p"], [str(w / "f")])),
    Case("prepare", "bids_empty", _empty_bids),
    Case("train", "stage1_bids_missing", lambda w: (
        ["train", "stage1", "--bids", w / "nope", "--run", w / "r"], [str(w / "nope")])),
    Case("train", "stage2_bids_missing", lambda w: (
        ["train", "stage2", "--bids", w / "nope", "--run", w / "r"], [str(w / "nope")])),
    Case("teacher", "fit_bids_missing", lambda w: (
        ["teacher", "fit", "--bids", w / "nope", "--run", w / "r"], [str(w / "nope")])),
    Case("annotate", "bids_missing", lambda w: (["annotate", "--bids", w / "nope", "--run", w / "r"],
                                                [str(w / "nope")])),
    Case("annotate", "bids_empty", lambda w: ((w / "b").mkdir() or None) or (
        ["annotate", "--bids", w / "b", "--run", w / "r"], [str(w / "b")])),
    Case("train", "mbm_corpus_missing", lambda w: (
        ["train", "mbm", "--corpus", w / "nope", "--run", w / "r"],
        [str(w / "nope" / "manifest.json"), "corpus build"])),
    Case("corpus", "build_bids_missing", lambda w: (
        ["corpus", "build", "--bids", w / "nope", "--out", w / "c", "--grid", w / "g.nii.gz"],
        [str(w / "nope")])),
    Case("corpus", "build_grid_not_an_image", _corpus_bad_grid),
    Case("corpus", "build_workers_zero", lambda w: (
        ["corpus", "build", "--bids", w, "--out", w / "c", "--grid", w / "g", "--workers", "0"],
        ["--workers"])),
    Case("pretrain-mbm", "bids_missing", lambda w: (
        ["pretrain-mbm", "--bids", w / "nope", "--run", w / "r"], [str(w / "nope")])),
    Case("decode", "run_missing", lambda w: (["decode", "--bids", w, "--run", w / "nope"],
                                             [str(w / "nope")])),
    Case("decode", "no_student", _run_without_student),
    Case("evaluate", "run_missing", lambda w: (["evaluate", "--run", w / "nope"], [str(w / "nope")])),
    Case("evaluate", "predictions_missing_fields", _predictions_missing_fields),
    Case("evaluate", "control_missing_fields", _control_missing_fields),
    Case("evaluate", "predictions_missing", lambda w: ((_run_dir(w) / "predictions.jsonl").unlink()
                                                       or None) or (
        ["evaluate", "--run", w / "run"], [str(w / "run" / "predictions.jsonl"), "not found"])),
    Case("run", "neither_bids_nor_simulate", lambda w: (["run", "--out", w / "o"],
                                                        ["--bids", "--simulate"])),
    Case("run", "both_bids_and_simulate", lambda w: (
        ["run", "--bids", w, "--simulate", "--out", w / "o"], ["--bids", "--simulate"])),
    Case("run", "out_is_file", _out_is_file("run", lambda w: ["--simulate"])),
    Case("run", "bids_missing", lambda w: (["run", "--bids", w / "nope", "--out", w / "o"],
                                           [str(w / "nope")])),
    Case("report", "run_missing", lambda w: (["report", "--run", w / "nope"], [str(w / "nope")])),
    Case("report", "run_is_file", lambda w: ((w / "f").write_text("x") and None) or (
        ["report", "--run", w / "f"], [str(w / "f")])),
    Case("report", "metrics_missing", _metrics_case(None, "not found")),
    Case("report", "metrics_truncated", _truncated_metrics),
    Case("report", "metrics_not_json", _metrics_case("hello, world", "JSON")),
    Case("report", "metrics_binary", _metrics_case(b"\xff\xfe\x00garbage")),
    Case("report", "metrics_empty", _metrics_case("")),
    Case("report", "metrics_list", _metrics_case("[1, 2]", "object")),
    Case("report", "metrics_missing_keys", _metrics_case('{"subjects": {}}', "total")),
    Case("report", "metrics_wrong_type", _metrics_case(json.dumps(
        {**_valid_metrics(), "total": {"bleu1": "high"}}), "total.bleu1")),
    Case("report", "metrics_subject_not_object", _metrics_case(json.dumps(
        {**_valid_metrics(), "subjects": {"sub-01": [1]}}), "sub-01")),
    Case("report", "predictions_bad_line", _bad_predictions),
    Case("report", "out_is_folder", lambda w: (["report", "--run", _run_dir(w), "--out", w],
                                               [str(w)])),
    # read when fmri2text is imported (the CPU kernels), checked before any command runs
    Case("machine", "cpu_kernels_unknown", lambda w: (["machine"], ["FMRI2TEXT_CPU_KERNELS",
                                                                    "avx512", "blas-avx2, native, avx2"]),
         env={"FMRI2TEXT_CPU_KERNELS": "avx512"}),
    Case("report", "samples_negative", lambda w: (["report", "--run", _run_dir(w), "--samples", "-1"],
                                                  ["--samples"])),
]


@pytest.fixture(scope="module")
def command_results(tmp_path_factory) -> dict:
    """Every COMMAND_CASES row run through the CLI entry point, one subprocess in all."""
    runs = {}
    for case in COMMAND_CASES:
        work = tmp_path_factory.mktemp(f"{case.command}-{case.name}")
        args, needles = case.setup(work)
        runs[(case.command, case.name)] = (args, work, needles, snapshot(work))
    lines = [(a, w, case.env) for (a, w, _, _), case in zip(runs.values(), COMMAND_CASES)]
    results = run_cli_batch(lines, tmp_path_factory.mktemp("batch") / "commands.json")
    return {key: (r, *rest[1:]) for (key, rest), r in zip(runs.items(), results)}


def _case_param(case: Case):
    marks = []
    if (case.command, case.name) in KNOWN_BUGS:
        marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[(case.command, case.name)]))
    return pytest.param(case, id=f"{case.command}-{case.name}", marks=marks)


@pytest.mark.parametrize("case", [_case_param(c) for c in COMMAND_CASES])
def test_bad_command_input(command_results: dict, case: Case):
    r, work, needles, before = command_results[(case.command, case.name)]
    assert_clear_user_error(r, *needles)
    assert snapshot(work) == before, "earlier artifacts changed, or partial output was written"


def test_valid_report_baseline(tmp_path: Path):
    """The report rows fail for the reason they test: the unmodified run reports fine."""
    run = _run_dir(tmp_path)
    r = run_cli("report", "--run", run, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "earlier report" not in (run / "report.html").read_text()
