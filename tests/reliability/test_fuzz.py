"""Property-based fuzzing: the config loader and the events/sidecar parsers either succeed
or raise UserError, never another exception (hypothesis; modest example counts)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fmri2text.config import Config, DataConfig, load_config, valid_keys
from fmri2text.data.bids import _read_events, load_trials
from fmri2text.errors import UserError
from tests.data.conftest import HAD_COLUMNS, had_rows, make_had

KEYS = valid_keys()
SECTIONS = sorted({k.split(".")[0] for k in KEYS})
FIELDS = sorted({k.split(".")[-1] for k in KEYS})
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.integers(),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["1e-3", "abc", "[1,2]", "true", "n/a", "", "-0", ".inf", "0x10"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=6)
names = st.one_of(st.sampled_from(FIELDS), st.text(max_size=8))
sections = st.dictionaries(names, values, max_size=4)
configs = st.one_of(
    st.dictionaries(st.one_of(st.sampled_from(SECTIONS), names), st.one_of(sections, values), max_size=4),
    values)


def _load_or_user_error(text: str | bytes, overrides: list[str]) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        try:
            cfg = load_config(path, overrides)
        except UserError as err:
            assert str(err)  # a message, whatever the input
            return
    assert isinstance(cfg, Config)


@FUZZ
@given(data=configs)
def test_config_mappings(data):
    _load_or_user_error(yaml.safe_dump(data, allow_unicode=True), [])


@FUZZ
@given(text=st.one_of(st.text(max_size=80), st.binary(max_size=80)))
def test_config_raw_text(text):
    _load_or_user_error(text, [])


@FUZZ
@given(overrides=st.lists(st.tuples(st.one_of(st.sampled_from(KEYS), st.text(max_size=10)),
                                    st.one_of(st.text(max_size=10), scalars.map(str)),
                                    st.sampled_from(["=", "", "=="])), max_size=3))
def test_config_overrides(overrides):
    try:
        cfg = load_config(None, [f"{k}{eq}{v}" for k, eq, v in overrides])
    except UserError:
        return
    assert isinstance(cfg, Config)


# ----------------------------------------------------------------------------- events and sidecars

cells = st.one_of(st.sampled_from(["n/a", "", "1.5", "-3", "inf", "nan", "1e400", "abc", "0", "12",
                                   "Archery/v_Archery_id_abcdefghijk_start_1.0_label_1.mp4",
                                   "../x.mp4", "/etc/passwd", '"q\tq"']),
                  st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=8))
headers = st.lists(st.one_of(st.sampled_from(HAD_COLUMNS), st.text(max_size=6)), min_size=0, max_size=7)


@st.composite
def tsv_texts(draw) -> str:
    header = draw(headers)
    n = len(header)
    rows = draw(st.lists(st.lists(cells, min_size=max(n - 1, 0), max_size=n + 1), max_size=5))
    sep = draw(st.sampled_from(["\t", "\t", ",", " "]))
    return "\n".join([sep.join(header)] + [sep.join(r) for r in rows]) + draw(st.sampled_from(["\n", ""]))


@FUZZ
@given(text=st.one_of(tsv_texts(), st.text(max_size=60), st.binary(max_size=60)))
def test_events_parser(text):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "sub-01_task-action_events.tsv"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        try:
            table = _read_events(str(path))
        except UserError as err:
            assert err.path == str(path) or err.path == path
            return
    assert {"onset", "duration", "stim_file"} <= set(table.columns)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_had(tmp_path_factory.mktemp("fuzz") / "ds", subjects=("01",), runs=1,
                    n_trials=10, n_volumes=40)


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=6)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=5)
sidecars = st.one_of(
    st.dictionaries(st.sampled_from(["RepetitionTime", "TaskName", "SliceTiming"]), json_values, max_size=3)
    .map(json.dumps),
    json_values.map(json.dumps), st.text(max_size=30))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(events_text=st.one_of(tsv_texts(), st.none()), sidecar=sidecars)
def test_load_trials_with_random_events_and_sidecar(dataset: Path, events_text, sidecar):
    func = dataset / "sub-01/ses-action01/func"
    stem = "sub-01_ses-action01_task-action_run-01"
    good = "\n".join(["\t".join(HAD_COLUMNS)] + ["\t".join(str(r[c]) for c in HAD_COLUMNS)
                                                 for r in had_rows("01", 1, 10)]) + "\n"
    (func / f"{stem}_events.tsv").write_text(good if events_text is None else events_text)
    (func / f"{stem}_bold.json").write_text(sidecar)
    try:
        table = load_trials(dataset, DataConfig(workers=1))
    except UserError:
        return
    assert len(table) >= 1 and table["onset"].notna().all()
