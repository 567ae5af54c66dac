"""Teacher pretraining pieces and annotation on tiny random parts and a few rendered web clips."""

import json

import av
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fmri2text.config import INSTRUCTIONS, TeacherConfig
from fmri2text.errors import UserError
from fmri2text.models import zoo
from fmri2text.models.teacher import build_teacher
from fmri2text.training import annotate as ann
from fmri2text.training import teacher as tt


def _write_mp4(path, n_frames, size=32, seed=0):
    rng = np.random.default_rng(seed)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for _ in range(n_frames):
            img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture()
def bids(tmp_path):
    folder = tmp_path / "bids" / tt.WEBCLIPS
    folder.mkdir(parents=True)
    caps = {}
    for i in range(4):
        _write_mp4(folder / f"w{i}.mp4", 6 if i < 3 else 2, seed=i)
        caps[f"w{i}.mp4"] = ["a red ball is bouncing .", "the red ball is bouncing ."]
    (folder / "captions.json").write_text(json.dumps(caps))
    return tmp_path / "bids"


@pytest.fixture(scope="module")
def teacher():
    llm, tok = zoo.tiny_llm(hidden=32, layers=2)
    return build_teacher(zoo.tiny_vision_backbone(64), llm, tok, zoo.tiny_bert(32, 2),
                         image_queries=4, video_queries=2, max_frames=8)


def test_short_clip_is_a_user_error(bids):
    clips = tt.list_web_clips(bids)
    assert len(clips) == 4 and clips[0].captions[0] == "a red ball is bouncing ."
    x = tt.read_clip_frames(clips[0].path, 4, 48)
    assert x.shape == (4, 3, 48, 48) and 0 <= x.min() and x.max() <= 1
    with pytest.raises(UserError, match="fewer than the 4 requested"):
        tt.read_clip_frames(clips[3].path, 4, 48)


def test_bad_captions_are_user_errors(bids):
    cap = bids / tt.WEBCLIPS / "captions.json"
    cap.write_text(json.dumps({"w0.mp4": []}))
    with pytest.raises(UserError, match="no usable captions"):
        tt.list_web_clips(bids)
    cap.write_text(json.dumps({"../../x.mp4": ["a"]}))
    with pytest.raises(UserError, match="leaves the web-clip folder"):
        tt.list_web_clips(bids)


def test_feature_cache_roundtrip_and_corrupt_file(bids, tmp_path, teacher):
    clips = tt.list_web_clips(bids)[:3]
    tcfg = TeacherConfig(n_frames=3, image_size=64)
    feats = tt.cached_features(teacher, clips, tcfg, tmp_path / "cache", log=lambda *a: None)
    assert feats.shape == (3, 3, 4, 1280)
    (cached,) = (tmp_path / "cache").glob("*.safetensors")
    assert torch.equal(tt.cached_features(teacher, clips, tcfg, tmp_path / "cache"), feats)
    cached.write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupt"):
        tt.cached_features(teacher, clips, tcfg, tmp_path / "cache")
    assert cached.read_bytes() == b"garbage"  # reported, not overwritten


def test_training_lowers_loss_and_checkpoint_roundtrips(tmp_path, teacher):
    torch.manual_seed(0)
    feats = torch.randn(6, 2, 4, 1280)
    caps = [["a red ball is bouncing ."], ["a blue cube is spinning ."]] * 3
    tcfg = TeacherConfig(steps=30, batch_size=6, lr=3e-3, seed=0)
    before = {k: v.clone() for k, v in teacher.trainable_state_dict().items()}
    fit = tt.train_steps(teacher, feats, caps, tcfg, log=lambda *a: None)
    assert np.mean(fit["losses"][-5:]) < np.mean(fit["losses"][:5]) - 0.005  # tiny random LLM: flat
    path = tt.save_checkpoint(teacher, tmp_path, tcfg)
    state = load_file(str(path))
    assert set(state) == set(before) and not any(k.startswith("llm.") for k in state)
    assert len(tt.checkpoint_hash(path)) == 16
    teacher.load_trainable_state_dict(before)  # restore for other tests


def test_captioning_trains_the_projection_on_first_captions_unless_told_otherwise(teacher, monkeypatch):
    """Default stage 2: Q-Formers frozen (their output computed once), llama_proj learns,
    every answer is the clip's first caption; train_qformers/captions=all restore the rest."""
    torch.manual_seed(0)
    feats = torch.randn(4, 2, 4, 1280)
    caps = [[f"first {i} .", f"second {i} ."] for i in range(4)]
    seen, real = [], type(teacher).loss_from_tokens

    def spy(self, tokens, instructions, answers):
        seen.extend(answers)
        return real(self, tokens, instructions, answers)

    monkeypatch.setattr(type(teacher), "loss_from_tokens", spy)
    before = {k: v.clone() for k, v in teacher.trainable_state_dict().items()}
    tt.train_steps(teacher, feats, caps, TeacherConfig(steps=3, batch_size=4, lr=1e-2), log=lambda *a: None)
    after = teacher.trainable_state_dict()
    changed = {k for k in before if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith("llama_proj") for k in changed)
    assert seen and all(a.startswith("first") for a in seen)
    assert all(p.requires_grad for p in teacher.trainable_parameters())  # restored afterwards
    seen.clear()
    tt.train_steps(teacher, feats, caps, TeacherConfig(steps=6, batch_size=4, lr=1e-2, train_qformers=True,
                                                       captions="all"), log=lambda *a: None)
    after = teacher.trainable_state_dict()
    assert not torch.equal(after["video_qformer.query_tokens"], before["video_qformer.query_tokens"])
    assert any(a.startswith("second") for a in seen)
    teacher.load_trainable_state_dict(before)  # restore for other tests


def test_itc_stage_aligns_queries_with_captions_and_leaves_the_projection(teacher):
    """BLIP-2 stage 1: the contrastive loss falls, Q-Formers move, llama_proj does not."""
    torch.manual_seed(0)
    feats = torch.randn(8, 2, 4, 1280)
    caps = [[f"a {c} {s} is {a} ."] for c, s, a in zip(
        ["red", "blue", "green", "white"] * 2, ["ball", "cube", "star", "ring"] * 2,
        ["bouncing"] * 4 + ["spinning"] * 4)]
    before = {k: v.clone() for k, v in teacher.trainable_state_dict().items()}
    tcfg = TeacherConfig(itc_steps=40, itc_batch_size=8, itc_lr=3e-3, seed=0)
    itc = tt.contrastive_steps(teacher, feats, caps, tcfg, log=lambda *a: None)
    assert itc["steps"] == 40 and np.mean(itc["losses"][-5:]) < np.mean(itc["losses"][:5]) - 0.5
    after = teacher.trainable_state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith("llama_proj"))
    assert not torch.equal(after["video_qformer.query_tokens"], before["video_qformer.query_tokens"])
    assert tt.contrastive_steps(teacher, feats, caps, TeacherConfig(itc_steps=0))["losses"] == []
    teacher.load_trainable_state_dict(before)  # restore for other tests


def test_split_is_disjoint_and_seeded():
    a, b = tt.split_clips(10, 0.2, seed=1)
    assert len(b) == 2 and not set(a) & set(b) and set(a) | set(b) == set(range(10))
    assert [x.tolist() for x in tt.split_clips(10, 0.2, seed=1)] == [a.tolist(), b.tolist()]


def test_annotation_is_seeded_stored_and_reused(tmp_path, teacher):
    clips = [f"clip{i}.mp4" for i in range(5)]
    frames = {c: torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(i))
              for i, c in enumerate(clips)}
    calls = []

    def load(c):
        calls.append(c)
        return frames[c]

    kw = dict(seed=0, batch_size=2, max_new_tokens=4, log=lambda *a: None)
    r1 = ann.annotate(teacher.eval(), "abc", clips, load, tmp_path, INSTRUCTIONS, **kw)
    assert r1["computed"] == 5 and r1["tokens"].shape == (5, 2, 32)
    assert set(r1["instructions"].values()) <= set(INSTRUCTIONS)
    assert r1["instructions"] == dict(zip(clips, ann.draw_instructions(clips, INSTRUCTIONS, 0)))
    calls.clear()
    r2 = ann.annotate(teacher, "abc", clips[::-1] + ["new.mp4"], lambda c: frames.get(c, frames[clips[0]]),
                      tmp_path, INSTRUCTIONS, **kw)
    assert r2["computed"] == 1 and r2["reused"] == 5
    assert all(r2["answers"][c] == r1["answers"][c] for c in clips)
    assert torch.equal(r2["tokens"][0], r1["tokens"][4])  # clips[::-1][0] == clips[4]
    r3 = ann.annotate(teacher, "other-teacher", clips[:1], load, tmp_path, INSTRUCTIONS, **kw)
    assert r3["computed"] == 1  # another checkpoint hash: not reused


def _trials(stim_path, stim_file="stimuli/s1.mp4", group="g1"):
    import pandas as pd

    return pd.DataFrame({"stim_file": [stim_file, "stimuli/s2.mp4"], "group": [group, "g2"],
                         "split": ["test", "train"], "stim_path": [str(stim_path), "absent"]})


def test_web_clip_leakage_guard(bids, tmp_path):
    from fmri2text.config import Config

    clips = tt.list_web_clips(bids)
    other = tmp_path / "s1.mp4"
    _write_mp4(other, 6, seed=99)  # a different clip: no leak
    tt.check_web_clip_leakage(clips, _trials(other))
    copy = tmp_path / "renamed-test-clip.mp4"
    copy.write_bytes(clips[1].path.read_bytes())  # same content under another name
    with pytest.raises(UserError, match="same content as test clip") as err:
        tt.check_web_clip_leakage(clips, _trials(copy, "stimuli/renamed-test-clip.mp4"))
    assert "w1.mp4" in str(err.value)
    with pytest.raises(UserError, match="has the id of a test clip"):
        tt.check_web_clip_leakage(clips, _trials(other, "stimuli/w2.mp4"))
    with pytest.raises(UserError, match="test stimulus group 'w3'"):
        tt.check_web_clip_leakage(clips, _trials(other, group="w3"))
    # group pattern applied to web-clip names (HAD: the YouTube id)
    named = [tt.WebClip(tmp_path / "v_x_id_abcdefghijk_start_3_label_1.mp4", ["a"])]
    pattern = r"_id_(?P<group>[A-Za-z0-9_-]{11})_start_"
    with pytest.raises(UserError, match="group 'abcdefghijk'"):
        tt.check_web_clip_leakage(named, _trials(other, group="abcdefghijk"), pattern)
    # fit_teacher refuses before building anything; no teacher folder is created
    out = tmp_path / "teacher"
    with pytest.raises(UserError, match="leakage"):
        tt.fit_teacher(bids, out, Config(), log=lambda *a: None,
                       experiment_trials=_trials(copy, "stimuli/renamed-test-clip.mp4"))
    assert not out.exists()


def test_copy_teacher_eval(tmp_path):
    teacher_dir, run = tmp_path / "teacher", tmp_path / "run"
    with pytest.raises(UserError, match="teacher_eval.json is missing"):
        tt.copy_teacher_eval(teacher_dir, run)
    teacher_dir.mkdir()
    record = {"video2text": {"bleu1": 40.0}, "no_video": {"bleu1": 10.0}}
    (teacher_dir / "teacher_eval.json").write_text(json.dumps(record))
    dst = tt.copy_teacher_eval(teacher_dir, run)
    assert dst == run / "teacher_eval.json" and json.loads(dst.read_text()) == record
    assert tt.copy_teacher_eval(teacher_dir, teacher_dir) == teacher_dir / "teacher_eval.json"
