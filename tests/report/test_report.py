"""The HTML report: every section, escaped text, embedded images, one row per subject."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from fmri2text.errors import UserError
from fmri2text.io import write_jsonl
from fmri2text.report.html import build_report, load_metrics, pick_samples

SECTIONS = ("summary", "table", "bars", "retrieval", "training", "samples", "brain")
SUBJECTS = ("sub-05", "sub-06", "sub-07")
EVIL = "<script>alert(1)</script>"


def _metrics(level: float, retrieval: bool = True) -> dict:
    m = {k: level + i for i, k in enumerate(
        ["bertscore_p", "bertscore_r", "bertscore_f1", "bleu1", "bleu2", "rougeL_p", "rougeL_r",
         "rougeL_f"])}
    if retrieval:
        m.update(top1=level / 2, top5=level, twoway=70.0, top1_chance=100 / 12,
                 top5_chance=500 / 12, twoway_chance=50.0, n_candidates=12)
    m["n_trials"] = 4
    return m


def _tiny_mp4(path: Path) -> None:
    from fmri2text.simulate.stimuli import encode_mp4

    frames = np.zeros((6, 32, 48, 3), dtype=np.uint8)  # (F, H, W, 3)
    for i in range(6):
        frames[i, :, i * 8:(i + 1) * 8] = (255, 40 * i, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_mp4(frames, fps=4))


def _brain_map(path: Path) -> None:
    import nibabel as nib
    from nilearn import datasets, image

    tpl = datasets.load_mni152_template(resolution=2)
    grid = image.resample_img(tpl, target_affine=np.diag([8.0, 8.0, 8.0]), interpolation="nearest",
                              force_resample=True, copy_header=True)
    noise = np.abs(np.random.default_rng(0).normal(size=grid.shape))  # (X, Y, Z)
    data = (noise * (grid.get_fdata() > 0)).astype(np.float32)  # inside the head only
    nib.save(nib.Nifti1Image(data, grid.affine), str(path))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    metrics = {
        "scorer": {"bertscore_model": "minilm", "layer": 6, "idf": False, "rescale": False},
        "reference": "video2text", "decoder": "fmri2text",
        "subjects": {s: _metrics(40 + i) for i, s in enumerate(SUBJECTS)},
        "total": _metrics(41),
        "controls": {"shuffled": _metrics(20, False), "prompt_only": _metrics(15, False),
                     "ridge": _metrics(45, False)},
        "controls_subjects": {"shuffled": {s: _metrics(20, False) for s in SUBJECTS}},
        "p_values": {"bertscore_f1": 0.0005, "bleu1": 0.001},
        "permutation": {"n_permutations": 2000, "subjects": {s: {"bertscore_f1": 0.01} for s in SUBJECTS}},
        "paired": {"controls": {"shuffled": {
            "subjects": {s: {"bertscore_f1": {"difference": 20.0, "p": 0.0123}} for s in SUBJECTS},
            "total": {"bertscore_f1": {"difference": 21.0, "p": 0.0234}}}}},
        "n_test_trials": 12,
        "vs_truth": {"subjects": {s: _metrics(30, False) for s in SUBJECTS}, "total": _metrics(30, False),
                     "controls": {"shuffled": _metrics(10, False)}},
        "timings_s": {"evaluate": 3.2},
    }
    (run / "metrics.json").write_text(json.dumps(metrics))
    rows = [{"subject": s, "run": 1, "onset": 12.0 + 4 * k, "stim": f"Class A/clip{k}.mp4",
             "instruction": "Describe the video.", "video2text": "A red square slides.",
             "fmri2text": EVIL if (s, k) == ("sub-05", 0) else "A red square moves.",
             "truth": ["A red square slides left.", "A square & a circle"]}
            for s in SUBJECTS for k in range(4)]
    write_jsonl(run / "predictions.jsonl", rows)
    _tiny_mp4(run / "bids" / "stimuli" / "Class A" / "clip0.mp4")  # clip1.. are absent
    (run / "stage1").mkdir()
    write_jsonl(run / "stage1" / "log.jsonl",
                [{"step": i, "loss": 1 / (i + 1), "clip": 0.5, "l2l1": 0.2, "lr": 1e-3} for i in range(5)])
    (run / "config.yaml").write_text("seed: 0\nnote: '<b>x</b>'\n")
    _brain_map(run / "brain_map.nii.gz")
    return run


class _Collector(HTMLParser):
    """Tags with their attributes, the text, and the rows of each table by id."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.table_rows: dict[str, list[str]] = {}
        self._table: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "table":
            self._table = attrs.get("id")
        elif tag == "tr" and self._table:
            self.table_rows.setdefault(self._table, []).append(attrs.get("class") or "")

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def report(run_dir) -> tuple[Path, str, _Collector]:
    path = build_report(run_dir, n_samples=4)
    html = path.read_text(encoding="utf-8")
    parser = _Collector()
    parser.feed(html)
    return path, html, parser


def test_every_section_and_default_path(report, run_dir):
    path, _, parser = report
    assert path == run_dir / "report.html"
    ids = {a.get("id") for t, a in parser.tags if t == "section"}
    assert set(SECTIONS) <= ids


def test_text_is_escaped_and_no_script(report):
    _, html, parser = report
    assert not any(t == "script" for t, _ in parser.tags)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert EVIL in "".join(parser.text)  # rendered as visible text
    assert "&lt;b&gt;x&lt;/b&gt;" in html  # config.yaml shown escaped
    assert "A square &amp; a circle" in html


def test_images_are_embedded(report):
    _, _, parser = report
    srcs = [a.get("src", "") for t, a in parser.tags if t == "img"]
    # 2 bar figures (reference, truth), retrieval, training, 3 frame strips, 2 brain views
    assert len(srcs) >= 8
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not any(t == "link" for t, _ in parser.tags)  # no external stylesheet


def test_table_rows(report):
    _, html, parser = report
    for table_id in ("table-reference", "table-truth"):
        rows = parser.table_rows[table_id]
        assert rows.count("subject") == len(SUBJECTS)
        assert rows.count("total") == 1
    ref = parser.table_rows["table-reference"]
    assert ref.count("control") == len(SUBJECTS)  # per-subject shuffled rows
    assert ref.count("control total") == 3
    assert "41.00" in html and "not above ridge baseline" in html
    # control rows carry the paired p that the decoder beats them (per subject, total)
    assert html.count(">0.0123<") == len(SUBJECTS) and html.count(">0.0234<") == 1
    assert "above chance (8.33)" in html  # retrieval has no control: compared to chance


def test_samples_and_missing_parts(report):
    _, html, _ = report
    assert html.count('class="card"') == 4
    assert "clip not found" in html  # the 4th card shows clip1, which is absent
    assert "Stage II" in html and "not run" in html


def test_minimal_run_says_not_available(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps(
        {"subjects": {"sub-01": {"bleu1": 12.0}}, "total": {"bleu1": 12.0}}))
    html = build_report(tmp_path, out=tmp_path / "r" / "x.html").read_text()
    assert "Brain map not available" in html and "Retrieval not scored" in html
    assert "No predictions.jsonl" in html


def test_odd_paired_section_leaves_the_control_p_blank(tmp_path):
    m = {"bleu1": 12.0, "bertscore_f1": 40.0}
    (tmp_path / "metrics.json").write_text(json.dumps(
        {"subjects": {"sub-01": m}, "total": m, "controls": {"shuffled": m},
         "controls_subjects": {"shuffled": {"sub-01": m}},
         "paired": {"controls": {"shuffled": ["not", "an", "object"]}}}))
    html = build_report(tmp_path, out=tmp_path / "r.html").read_text()
    assert html.count('class="control') == 2  # both control rows are there, p left blank


@pytest.mark.parametrize("content, match", [
    (None, "not found"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"subjects": {}}', "total"),
    ('{"subjects": {"sub-01": {"bleu1": "high"}}, "total": {}}', "must be a number"),
])
def test_bad_metrics_is_user_error(tmp_path, content, match):
    if content is not None:
        (tmp_path / "metrics.json").write_text(content)
    with pytest.raises(UserError, match=match) as err:
        build_report(tmp_path)
    assert err.value.path == tmp_path / "metrics.json" and err.value.fix
    assert not (tmp_path / "report.html").exists()


def test_pick_samples_spreads_over_subjects():
    rows = [{"subject": s, "k": k} for s in "ab" for k in range(3)]
    assert [(r["subject"], r["k"]) for r in pick_samples(rows, 3)] == [("a", 0), ("b", 0), ("a", 1)]


def test_load_metrics_accepts_contract(run_dir):
    assert set(load_metrics(run_dir / "metrics.json")["subjects"]) == set(SUBJECTS)


def _chromium() -> str | None:
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.mark.skipif(_chromium() is None, reason="chromium not installed (.ci/run installs Debian's chromium as root)")
def test_renders_in_headless_chromium(report, tmp_path):
    path, _, _ = report
    proc = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path}",
         "--enable-logging=stderr", "--v=0", "--dump-dom",
         path.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ":CONSOLE" not in proc.stderr, proc.stderr[-2000:]  # no page error or failed load
    dom = _Collector()
    dom.feed(proc.stdout)
    assert set(SECTIONS) <= {a.get("id") for t, a in dom.tags if t == "section"}
    assert not any(t == "script" for t, _ in dom.tags)
    assert EVIL in "".join(dom.text)


def test_sample_card_bad_clip_and_escape_attempt(tmp_path):
    from fmri2text.report.html import sample_card

    (tmp_path / "stimuli").mkdir()
    (tmp_path / "stimuli" / "bad.mp4").write_bytes(b"not a video at all")
    (tmp_path / "secret.mp4").write_bytes(b"outside stimuli/")
    row = {"subject": "sub-01", "run": 1, "onset": 3.0, "instruction": "i", "video2text": None,
           "fmri2text": "f", "truth": None}
    bad = sample_card({**row, "stim": "bad.mp4"}, [tmp_path / "x"])
    assert bad["strip"] is None and "not found" in bad["note"]
    bad = sample_card({**row, "stim": "bad.mp4"}, [tmp_path])
    assert bad["strip"] is None and "could not be decoded" in bad["note"]
    escape = sample_card({**row, "stim": "../../secret.mp4"}, [tmp_path / "stimuli" / "sub"])
    assert escape["strip"] is None and "not found" in escape["note"]
