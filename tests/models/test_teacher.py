"""The Video-LLaMA teacher on tiny random parts: shapes, freezing, determinism, checkpoints."""

import pytest
import torch

from fmri2text.errors import UserError
from fmri2text.models import zoo
from fmri2text.models.teacher import QFormer, build_teacher


@pytest.fixture(scope="module")
def parts():
    llm, tok = zoo.tiny_llm(hidden=32, layers=2)
    return zoo.tiny_vision_backbone(image_size=64), llm, tok, zoo.tiny_bert(hidden=32, layers=2)


def _teacher(parts, **kw):
    backbone, llm, tok, bert = parts
    kw = {"image_queries": 4, "video_queries": 3, "max_frames": 8, **kw}
    return build_teacher(backbone, llm, tok, bert, **kw)


def test_video_tokens_shape_and_scale(parts):
    teacher = _teacher(parts)
    frames = torch.rand(2, 3, 3, 40, 40)  # (B, F, 3, H, W), resized to 64 px inside
    feats = teacher.frame_features(frames)
    assert feats.shape == (2, 3, 4, 1280)  # 64 px -> 2 x 2 patches of EfficientNet-Lite0
    x = teacher.video_tokens(frames)
    assert x.shape == (2, 3, 32) and teacher.n_tokens == 3
    assert torch.allclose(x.std(-1, unbiased=False).mean(), teacher.token_scale, rtol=0.05)
    with pytest.raises(ValueError, match="max_frames"):
        teacher.video_tokens_from_features(torch.zeros(1, 9, 4, 1280))


def test_mlp_projector_maps_queries_to_llm_tokens(parts):
    teacher = _teacher(parts, projector="mlp", projector_hidden=16)
    assert [type(m).__name__ for m in teacher.llama_proj] == ["Linear", "GELU", "Linear"]
    assert teacher.llama_proj[0].out_features == 16 and teacher.d_llm == 32
    x = teacher.video_tokens(torch.rand(2, 3, 3, 64, 64))
    assert x.shape == (2, 3, 32)
    assert "llama_proj.2.weight" in teacher.trainable_state_dict()
    with pytest.raises(UserError, match="unknown teacher.projector='conv'"):
        _teacher(parts, projector="conv")


def test_qformer_initialised_from_bert_where_shapes_agree(parts):
    bert = parts[3]
    q = QFormer(4, 32, 2, 2, 128, encoder_width=20)
    copied = q.init_from_bert(bert)
    assert torch.equal(q.layer[1].attention.attention.query.weight,
                       bert.encoder.layer[1].attention.self.query.weight)
    assert torch.equal(q.layer[0].output_query.dense.weight, bert.encoder.layer[0].output.dense.weight)
    assert not any("crossattention" in k for k in copied)
    assert len(copied) == 2 + 2 * 16


def test_frozen_parts_stay_frozen_and_trainable_parts_change(parts):
    teacher = _teacher(parts)
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()
              if k.startswith(("llm.", "visual_encoder."))}
    trainable = {k: v.clone() for k, v in teacher.trainable_state_dict().items()}
    opt = torch.optim.AdamW(teacher.trainable_parameters(), lr=1e-2)
    teacher.train()
    assert not teacher.visual_encoder.training and not teacher.llm.training
    feats = teacher.frame_features(torch.rand(2, 2, 3, 64, 64))
    loss = teacher.loss_from_features(feats, ["describe the video ."] * 2, ["a red ball .", "a cube ."])
    loss.backward()
    assert all(p.grad is None for p in teacher.llm.parameters())
    assert all(p.grad is None for p in teacher.visual_encoder.parameters())
    opt.step()
    after = teacher.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # BN stats included
    changed = [k for k, v in trainable.items() if not torch.equal(after[k], v)]
    assert any(k.startswith("image_qformer.") for k in changed)
    assert any(k.startswith("video_qformer.") for k in changed)
    assert "llama_proj.weight" in changed and "frame_position_embedding.weight" in changed


def test_answer_is_deterministic_under_greedy(parts):
    teacher = _teacher(parts).eval()
    frames = torch.rand(3, 2, 3, 64, 64)
    instr = ["describe the video .", "what is happening ?", "describe the video ."]
    a = teacher.answer(frames, instr, max_new_tokens=5)
    b = teacher.answer(frames, instr, max_new_tokens=5)
    assert a == b and len(a) == 3 and all(isinstance(s, str) for s in a)


def test_checkpoint_with_wrong_shapes_is_refused_and_nothing_changes(parts):
    teacher = _teacher(parts)
    state = teacher.trainable_state_dict()
    other = _teacher(parts, video_queries=5, seed=1).trainable_state_dict()
    before = {k: v.clone() for k, v in state.items()}
    with pytest.raises(UserError, match="wrong shape.*video_qformer.query_tokens"):
        teacher.load_trainable_state_dict(other, source="bad.safetensors")
    bad = dict(state)
    bad.pop("llama_proj.bias")
    bad["extra.weight"] = torch.zeros(1)
    with pytest.raises(UserError, match="missing: llama_proj.bias.*unexpected: extra.weight"):
        teacher.load_trainable_state_dict(bad)
    assert all(torch.equal(teacher.trainable_state_dict()[k], v) for k, v in before.items())
    teacher.load_trainable_state_dict(state)  # a matching checkpoint loads


def test_too_many_qformer_layers_for_the_bert_is_a_user_error(parts):
    with pytest.raises(UserError, match="exceed"):
        _teacher(parts, image_layers=3)


def test_backbone_runs_frames_in_chunks_with_the_same_output(monkeypatch):
    bb = zoo.tiny_vision_backbone(image_size=64)
    frames = torch.rand(11, 3, 48, 48)  # resized to 64 px first
    whole = bb._features(frames)  # one forward over all frames
    monkeypatch.setattr(zoo.VisionBackbone, "CHUNK_PIXELS", 4 * 64 * 64)  # chunks of 4 frames
    calls = []
    monkeypatch.setattr(bb, "_features", lambda x, f=bb._features: calls.append(len(x)) or f(x))
    out = bb.features(frames)
    assert calls == [4, 4, 3]
    assert torch.equal(out, whole) and out.shape == (11, bb.n_patches, bb.width)


def test_backbone_keeps_its_loaded_weights_and_batchnorm_statistics():
    """Wrapping EfficientNet (whose shape probe runs a forward) changes no tensor: a probe in
    training mode moved the BatchNorm running statistics, through an unseeded drop-connect,
    so every process got other features of the same clips. The shipped backbone equals its
    weights file, tensor for tensor."""
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    net = EfficientNet.from_name("efficientnet-lite0", image_size=64)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    bb = zoo.VisionBackbone(net, 64)
    after = bb.net.state_dict()
    assert any("running_var" in k for k in before)  # the statistics are compared too
    assert before.keys() == after.keys()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []

    real = zoo.load_vision_backbone("efficientnet-lite0", 128)
    state = torch.load(zoo.efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    loaded = real.net.state_dict()
    assert [k for k, v in state.items() if not torch.equal(v, loaded[k])] == []
