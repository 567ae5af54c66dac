"""Checkpoint importers and the real-size preset, on tiny synthetic checkpoints.

The BLIP-2 checkpoint is written by transformers' own ``Blip2ForConditionalGeneration``
(tiny config), so its key names and shapes are exactly the published layout. The
Video-LLaMA one is a ``torch.save`` dict with the key names of Video-LLaMA's
``VideoLLAMA`` module (``video_Qformer.bert.…``, LAVIS BERT naming) written out literally.
"""

import json

import pytest
import torch
from safetensors.torch import save_file

from fmri2text.config import TeacherConfig
from fmri2text.errors import UserError
from fmri2text.models import import_blip2 as ib
from fmri2text.models import zoo
from fmri2text.models.teacher import build_teacher, resolve_preset, teacher_from_config

H, INTER, QUERIES = 32, 128, 4  # Q-Former width / FFN / image queries of the tiny checkpoint


@pytest.fixture(scope="module")
def hf_blip2(tmp_path_factory):
    """A tiny HF BLIP-2 saved with save_pretrained (config.json + model.safetensors)."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    cfg = Blip2Config(
        vision_config=dict(hidden_size=H, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=28, patch_size=14),
        qformer_config=dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=INTER, encoder_hidden_size=H,
                            cross_attention_frequency=2, vocab_size=64, max_position_embeddings=16),
        text_config=dict(model_type="opt", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         ffn_dim=32, vocab_size=64, max_position_embeddings=32, word_embed_proj_dim=16),
        num_query_tokens=QUERIES)
    torch.manual_seed(1)
    model = Blip2ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # LayerNorms start at (1, 0): make them informative
        for name, p in model.named_parameters():
            if "norm" in name.lower():
                p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path_factory.mktemp("blip2")
    model.save_pretrained(folder)
    return model, folder


def _teacher(backbone, video_queries=2, max_frames=8):
    llm, tok = zoo.tiny_llm(hidden=32, layers=1)
    return build_teacher(backbone, llm, tok, None, hidden=H, heads=2, image_queries=QUERIES,
                         image_layers=2, cross_attention_frequency=2, video_queries=video_queries,
                         video_layers=2, max_frames=max_frames)


def test_blip2_import_reproduces_hf_qformer(hf_blip2):
    model, folder = hf_blip2
    teacher = _teacher(ib.build_blip2_vision(folder))
    report = ib.import_blip2(folder, teacher)
    assert "image_qformer.layer.0.crossattention.attention.key.weight" in report.loaded
    assert "visual_encoder.model.encoder.layers.1.self_attn.qkv.weight" in report.loaded
    assert "ln_vision.weight" in report.loaded
    assert any(k.startswith("language_projection.") for k in report.skipped)
    frames = torch.rand(2, 3, 28, 28)
    ours = teacher.image_qformer(teacher.ln_vision(teacher.visual_encoder.features(frames)))
    pixels = (frames - teacher.visual_encoder.mean) / teacher.visual_encoder.std
    with torch.no_grad():
        enc = model.vision_model(pixel_values=pixels).last_hidden_state  # (2, 5, H)
        ref = model.qformer(query_embeds=model.query_tokens.expand(2, -1, -1),
                            encoder_hidden_states=enc).last_hidden_state  # (2, Q, H)
    assert ours.shape == ref.shape == (2, QUERIES, H)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_blip2_mismatches_are_refused_and_nothing_loads(hf_blip2, tmp_path):
    from safetensors.torch import load_file

    _, folder = hf_blip2
    state = load_file(str(folder / "model.safetensors"))
    teacher = _teacher(ib.build_blip2_vision(folder))
    before = teacher.image_qformer.query_tokens.detach().clone()
    bad = dict(state)
    bad["query_tokens"] = torch.zeros(1, QUERIES + 1, H)  # wrong shape
    bad["qformer.extra.weight"] = torch.zeros(2)  # unexpected
    del bad["qformer.encoder.layer.1.output_query.dense.bias"]  # missing
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(UserError) as err:
        ib.import_blip2(tmp_path / "bad.safetensors", teacher)
    msg = str(err.value)
    assert "bad.safetensors" in msg and "qformer.extra.weight" in msg
    assert "image_qformer.layer.1.output_query.dense.bias" in msg and "query_tokens (1, 5, 32)" in msg
    assert torch.equal(teacher.image_qformer.query_tokens, before)
    # a teacher whose Q-Former has cross-attention in every layer lacks the published layer 1 one
    llm, tok = zoo.tiny_llm(hidden=32, layers=1)
    every = build_teacher(ib.build_blip2_vision(folder), llm, tok, None, hidden=H, heads=2,
                          image_queries=QUERIES, image_layers=2, cross_attention_frequency=1)
    with pytest.raises(UserError, match="missing.*layer.1.crossattention"):
        ib.import_blip2(folder, every)


def _published_videollama(teacher, d_llm):
    """Video-LLaMA(-2) VL checkpoint keys (literal names) with random tensors of our shapes."""
    g = torch.Generator().manual_seed(3)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    vq = teacher.video_qformer
    L = vq.query_tokens.shape[1]
    state = {"video_query_tokens": rnd(1, L, H),
             "video_frame_position_embedding.weight": rnd(teacher.frame_position_embedding.num_embeddings, H),
             "video_Qformer.bert.embeddings.LayerNorm.weight": rnd(H),
             "video_Qformer.bert.embeddings.LayerNorm.bias": rnd(H),
             "video_Qformer.bert.embeddings.position_ids": torch.arange(16)[None],
             "audio_Qformer.bert.embeddings.position_ids": torch.arange(16)[None],
             "llama_proj.weight": rnd(d_llm, H), "llama_proj.bias": rnd(d_llm)}
    for i in range(len(vq.layer)):
        p = f"video_Qformer.bert.encoder.layer.{i}."
        for block in ("attention", "crossattention"):
            for part in ("query", "key", "value"):
                state[f"{p}{block}.self.{part}.weight"] = rnd(H, H)
                state[f"{p}{block}.self.{part}.bias"] = rnd(H)
            state[f"{p}{block}.output.dense.weight"] = rnd(H, H)
            state[f"{p}{block}.output.dense.bias"] = rnd(H)
            state[f"{p}{block}.output.LayerNorm.weight"] = rnd(H)
            state[f"{p}{block}.output.LayerNorm.bias"] = rnd(H)
        state[f"{p}intermediate_query.dense.weight"] = rnd(INTER, H)
        state[f"{p}intermediate_query.dense.bias"] = rnd(INTER)
        state[f"{p}output_query.dense.weight"] = rnd(H, INTER)
        state[f"{p}output_query.dense.bias"] = rnd(H)
        state[f"{p}output_query.LayerNorm.weight"] = rnd(H)
        state[f"{p}output_query.LayerNorm.bias"] = rnd(H)
    return state


def test_videollama_pth_import_and_refusals(tmp_path):
    teacher = _teacher(zoo.tiny_vision_backbone(64), video_queries=3, max_frames=6)
    state = _published_videollama(teacher, teacher.d_llm)
    path = tmp_path / "VL_LLaMA_2_7B_Finetuned.pth"
    torch.save({"model": state, "config": {"run": {"task": "video_text_pretrain"}},
                "optimizer": {"state": {}, "param_groups": []}, "scaler": None, "epoch": 2}, path)
    report = ib.import_videollama(path, teacher)
    assert "video_Qformer.bert.embeddings.position_ids" in report.skipped
    sd = teacher.state_dict()
    assert torch.equal(sd["video_qformer.layer.1.crossattention.attention.value.weight"],
                       state["video_Qformer.bert.encoder.layer.1.crossattention.self.value.weight"])
    assert torch.equal(sd["video_qformer.query_tokens"], state["video_query_tokens"])
    assert torch.equal(sd["frame_position_embedding.weight"], state["video_frame_position_embedding.weight"])
    assert torch.equal(sd["llama_proj.bias"], state["llama_proj.bias"])
    assert torch.equal(sd["video_qformer.layernorm.weight"],
                       state["video_Qformer.bert.embeddings.LayerNorm.weight"])
    # wrong projection width (a 4096-wide LLaMA checkpoint into a smaller LLM) and a stray key
    bad = dict(state, **{"llama_proj.weight": torch.zeros(4096, H), "video_Qformer.cls.x": torch.zeros(1)})
    torch.save({"model": bad}, tmp_path / "bad.pth")
    with pytest.raises(UserError) as err:
        ib.import_videollama(tmp_path / "bad.pth", teacher)
    msg = str(err.value)
    assert "bad.pth" in msg and "llama_proj.weight (4096, 32)" in msg and "video_Qformer.cls.x" in msg
    # an audio-language checkpoint has no video branch: everything is listed as missing
    save_file({"audio_query_tokens": torch.zeros(1, 8, H)}, str(tmp_path / "al.safetensors"))
    with pytest.raises(UserError, match="missing .*video_qformer"):
        ib.import_videollama(tmp_path / "al.safetensors", teacher)
    with pytest.raises(UserError, match="not found"):
        ib.import_videollama(tmp_path / "absent.pth", teacher)


def test_preset_resolves_real_sizes_and_names_missing_files(tmp_path):
    real = resolve_preset(TeacherConfig(preset="videollama2-7b", image_queries=16))
    assert (real.vision, real.image_size, real.video_queries, real.image_layers) == ("eva-vit-g", 224, 32, 12)
    assert real.image_queries == 16 and real.qformer_hidden == 768  # explicit value kept
    assert resolve_preset(TeacherConfig()) == TeacherConfig()
    with pytest.raises(UserError, match="unknown teacher preset"):
        resolve_preset(TeacherConfig(preset="gpt5"))
    with pytest.raises(UserError, match="teacher.llm=/path"):
        teacher_from_config(TeacherConfig(preset="videollama2-7b"))
    llm_dir = tmp_path / "Llama-2-7b-chat-hf"
    llm_dir.mkdir()
    with pytest.raises(UserError, match="config.json"):
        teacher_from_config(TeacherConfig(preset="videollama2-7b", llm=str(llm_dir)))
    (llm_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match="teacher.blip2_checkpoint"):
        teacher_from_config(TeacherConfig(preset="videollama2-7b", llm=str(llm_dir)))
    blip = tmp_path / "blip2-opt-2.7b"
    with pytest.raises(UserError, match="blip2-opt-2.7b"):
        teacher_from_config(TeacherConfig(preset="videollama2-7b", llm=str(llm_dir),
                                          blip2_checkpoint=str(blip)))
    blip.mkdir()
    vl = tmp_path / "VL_LLaMA_2_7B_Finetuned.pth"
    with pytest.raises(UserError, match="VL_LLaMA_2_7B_Finetuned.pth"):
        teacher_from_config(TeacherConfig(preset="videollama2-7b", llm=str(llm_dir),
                                          blip2_checkpoint=str(blip), videollama_checkpoint=str(vl)))


def test_eva_backbone_sizes_from_checkpoint_config(hf_blip2):
    _, folder = hf_blip2
    bb = ib.build_blip2_vision(folder)
    assert (bb.width, bb.image_size, bb.n_patches) == (H, 28, 5)
    assert not any(p.requires_grad for p in bb.parameters())
    assert bb.features(torch.rand(3, 3, 40, 40)).shape == (3, 5, H)  # resized to 28 px
    eva = ib.blip2_vision_config(folder.parent / "elsewhere" / "m.safetensors")  # no config.json: EVA ViT-g
    assert (eva.hidden_size, eva.num_hidden_layers, eva.patch_size) == (1408, 39, 14)
