"""The Video-LLaMA teacher: frozen vision backbone -> Q-Formers -> projection -> frozen LLM.

Data flow for a batch of clips (shapes for the embedded config in brackets)::

    frames (B, F, 3, H, W)
      -> frozen backbone per frame              (B*F, P, C)      [P=16 at 128 px, C=1280]
      -> ln_vision                              (B*F, P, C)
      -> image Q-Former, Qi queries             (B*F, Qi, h)     [h=384, MiniLM init]
      -> + frame position embedding             (B, F*Qi, h)
      -> video Q-Former, L queries              (B, L, h)
      -> llama_proj [+ fixed rescale]           (B, L, d_llm)    = video tokens X
         (linear as in Video-LLaMA, or a 2-layer GELU MLP as in LLaVA-1.5)
      -> frozen LLM chat prompt: X, instruction, answer

Only ``ln_vision``, both Q-Formers, the frame position embedding and ``llama_proj`` train.
The Q-Former layers are BERT layers with an added cross-attention, named as in HF's
``Blip2QFormerModel`` (``attention.attention.query`` …, ``crossattention``,
``intermediate_query``, ``output_query``) so published weights map by key.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from fmri2text.errors import UserError
from fmri2text.models import generation
from fmri2text.models import llm as llm_mod

#: Parameter-name prefixes of the query side: everything trainable before the projection
#: (what BLIP-2's contrastive stage 1 trains).
QUERY_SIDE = ("ln_vision", "image_qformer", "frame_position_embedding", "video_qformer")
#: Parameter-name prefixes of the trainable part (what a teacher checkpoint holds).
TRAINABLE = (*QUERY_SIDE, "llama_proj")


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention; keys/values may come from a wider encoder."""

    def __init__(self, hidden: int, heads: int, kv_width: int | None = None):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden {hidden} not divisible by {heads} heads")
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width or hidden, hidden)
        self.value = nn.Linear(kv_width or hidden, hidden)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """x (N, Q, h), context (N, K, c) or None (self-attention) -> (N, Q, h)."""
        ctx = x if context is None else context
        N, Q, h = x.shape
        split = lambda t: t.view(N, -1, self.heads, h // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(ctx)), split(self.value(ctx))
        out = nn.functional.scaled_dot_product_attention(q, k, v)  # (N, heads, Q, h/heads)
        return out.transpose(1, 2).reshape(N, Q, h)


class ResidualOutput(nn.Module):
    """BERT's post-LN residual: LayerNorm(dense(y) + x)."""

    def __init__(self, width_in: int, hidden: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(width_in, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, y: Tensor, x: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(y) + x)


class AttentionBlock(nn.Module):
    """Attention followed by its residual output (``attention.attention`` / ``attention.output``)."""

    def __init__(self, hidden: int, heads: int, eps: float, kv_width: int | None = None):
        super().__init__()
        self.attention = MultiHeadAttention(hidden, heads, kv_width)
        self.output = ResidualOutput(hidden, hidden, eps)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.output(self.attention(x, context), x)


class Dense(nn.Module):
    """``intermediate_query``: dense + GELU."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.dense = nn.Linear(hidden, intermediate)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.gelu(self.dense(x))


class QFormerLayer(nn.Module):
    """Self-attention over queries, optional cross-attention to the encoder, feed-forward."""

    def __init__(self, hidden: int, heads: int, intermediate: int, encoder_width: int,
                 cross: bool, eps: float = 1e-12):
        super().__init__()
        self.attention = AttentionBlock(hidden, heads, eps)
        self.crossattention = AttentionBlock(hidden, heads, eps, encoder_width) if cross else None
        self.intermediate_query = Dense(hidden, intermediate)
        self.output_query = ResidualOutput(intermediate, hidden, eps)

    def forward(self, q: Tensor, enc: Tensor) -> Tensor:
        """q (N, Q, h), enc (N, K, c) -> (N, Q, h)."""
        q = self.attention(q)
        if self.crossattention is not None:
            q = self.crossattention(q, enc)
        return self.output_query(self.intermediate_query(q), q)


class QFormer(nn.Module):
    """BLIP-2's querying transformer: learned queries read an encoder's tokens.

    Parameters
    ----------
    n_queries, hidden, layers, heads, intermediate:
        Query count and BERT-layer sizes (BLIP-2: 32, 768, 12, 12, 3072).
    encoder_width:
        Width of the tokens cross-attended to.
    cross_attention_frequency:
        Cross-attention in every n-th layer (BLIP-2: 2); 1 puts it in every layer.
    """

    def __init__(self, n_queries: int, hidden: int, layers: int, heads: int, intermediate: int,
                 encoder_width: int, cross_attention_frequency: int = 1, eps: float = 1e-12):
        super().__init__()
        self.query_tokens = nn.Parameter(torch.randn(1, n_queries, hidden) * 0.02)
        self.layernorm = nn.LayerNorm(hidden, eps=eps)
        self.layer = nn.ModuleList(
            QFormerLayer(hidden, heads, intermediate, encoder_width,
                         cross=(i % cross_attention_frequency == 0), eps=eps)
            for i in range(layers))
        self.hidden = hidden

    def forward(self, enc: Tensor) -> Tensor:
        """enc (N, K, c) -> query outputs (N, Q, h)."""
        q = self.layernorm(self.query_tokens.expand(enc.shape[0], -1, -1))
        for layer in self.layer:
            q = layer(q, enc)
        return q

    @torch.no_grad()
    def init_from_bert(self, bert: nn.Module) -> list[str]:
        """Copy a transformers ``BertModel``'s weights where names and shapes agree.

        Self-attention, feed-forward and LayerNorms of layer i come from BERT layer i;
        cross-attention stays randomly initialised (as in BLIP-2). Returns the copied names.
        """
        src = bert.state_dict()
        copied = []
        pairs = {"layernorm.weight": "embeddings.LayerNorm.weight",
                 "layernorm.bias": "embeddings.LayerNorm.bias"}
        for i in range(len(self.layer)):
            a, b = f"layer.{i}.", f"encoder.layer.{i}."
            for part in ("query", "key", "value"):
                for t in ("weight", "bias"):
                    pairs[f"{a}attention.attention.{part}.{t}"] = f"{b}attention.self.{part}.{t}"
            for t in ("weight", "bias"):
                pairs[f"{a}attention.output.dense.{t}"] = f"{b}attention.output.dense.{t}"
                pairs[f"{a}attention.output.LayerNorm.{t}"] = f"{b}attention.output.LayerNorm.{t}"
                pairs[f"{a}intermediate_query.dense.{t}"] = f"{b}intermediate.dense.{t}"
                pairs[f"{a}output_query.dense.{t}"] = f"{b}output.dense.{t}"
                pairs[f"{a}output_query.LayerNorm.{t}"] = f"{b}output.LayerNorm.{t}"
        own = dict(self.named_parameters())
        for dst, key in pairs.items():
            if key in src and dst in own and own[dst].shape == src[key].shape:
                own[dst].copy_(src[key])
                copied.append(dst)
        return copied


class VideoLLaMATeacher(nn.Module):
    """Video-LLaMA's vision-language branch on a frozen backbone and a frozen LLM.

    Parameters
    ----------
    backbone:
        Frozen per-frame encoder with ``features(frames (N,3,H,W)) -> (N, P, C)`` and ``width``.
    llm, tokenizer:
        Frozen causal LLM and its tokenizer (see :mod:`fmri2text.models.llm`).
    image_qformer, video_qformer:
        The two Q-Formers; the video one cross-attends to the image one's outputs.
    max_frames:
        Number of frame position embeddings.
    token_norm:
        Rescale each projected token to zero mean and the LLM's input-embedding std (a fixed,
        parameter-free step after the projection that keeps soft tokens in range).
    system:
        System prompt for the chat template (None: the template's default).
    projector, projector_hidden:
        ``llama_proj``: "linear" (Video-LLaMA; published checkpoints map onto it) or "mlp"
        (Linear → GELU → Linear of width ``projector_hidden``, LLaVA-1.5's projector).
    """

    def __init__(self, backbone: nn.Module, llm: nn.Module, tokenizer, image_qformer: QFormer,
                 video_qformer: QFormer, max_frames: int = 32, token_norm: bool = True,
                 system: str | None = None, projector: str = "linear", projector_hidden: int = 1024):
        super().__init__()
        self.visual_encoder = llm_mod.freeze(backbone)
        self.llm = llm_mod.freeze(llm)
        self.tokenizer = tokenizer
        self.system = system
        self.ln_vision = nn.LayerNorm(backbone.width)
        self.image_qformer = image_qformer
        self.frame_position_embedding = nn.Embedding(max_frames, image_qformer.hidden)
        nn.init.normal_(self.frame_position_embedding.weight, std=0.02)
        self.video_qformer = video_qformer
        d_llm = llm.get_input_embeddings().weight.shape[1]
        self.d_llm = d_llm
        h = video_qformer.hidden
        if projector == "linear":
            self.llama_proj = nn.Linear(h, d_llm)
        elif projector == "mlp":
            self.llama_proj = nn.Sequential(nn.Linear(h, projector_hidden), nn.GELU(),
                                            nn.Linear(projector_hidden, d_llm))
        else:
            raise UserError(f"unknown teacher.projector={projector!r}", fix="use linear or mlp")
        self.token_norm = token_norm
        self.register_buffer("token_scale", torch.tensor(llm_mod.embedding_std(llm)), persistent=False)

    # -- modes: frozen parts never leave eval mode (no BatchNorm statistic updates)
    def train(self, mode: bool = True) -> "VideoLLaMATeacher":
        super().train(mode)
        self.visual_encoder.eval()
        self.llm.eval()
        return self

    @property
    def n_tokens(self) -> int:
        """L, the number of video tokens per clip."""
        return self.video_qformer.query_tokens.shape[1]

    def frame_features(self, frames: Tensor) -> Tensor:
        """(B, F, 3, H, W) in [0, 1] -> frozen backbone patch features (B, F, P, C)."""
        if frames.dim() != 5 or frames.shape[2] != 3:
            raise ValueError(f"frames must be (B, F, 3, H, W), got {tuple(frames.shape)}")
        B, F = frames.shape[:2]
        feats = self.visual_encoder.features(frames.flatten(0, 1))  # (B*F, P, C)
        return feats.view(B, F, *feats.shape[1:])

    def video_queries_from_features(self, feats: Tensor) -> Tensor:
        """Cached backbone features (B, F, P, C) -> video Q-Former output (B, L, h)."""
        B, F, P, C = feats.shape
        if F > self.frame_position_embedding.num_embeddings:
            raise ValueError(f"{F} frames exceed max_frames={self.frame_position_embedding.num_embeddings}")
        x = self.ln_vision(feats.flatten(0, 1).float())  # (B*F, P, C)
        q = self.image_qformer(x)  # (B*F, Qi, h)
        q = q.view(B, F, q.shape[1], q.shape[2])  # (B, F, Qi, h)
        pos = self.frame_position_embedding(torch.arange(F, device=q.device))  # (F, h)
        q = (q + pos[None, :, None, :]).flatten(1, 2)  # (B, F*Qi, h)
        return self.video_qformer(q)  # (B, L, h)

    def tokens_from_queries(self, q: Tensor) -> Tensor:
        """Video Q-Former output (B, L, h) -> video tokens (B, L, d_llm)."""
        tokens = self.llama_proj(q)  # (B, L, d_llm)
        if self.token_norm:
            tokens = nn.functional.layer_norm(tokens, tokens.shape[-1:]) * self.token_scale
        return tokens

    def video_tokens_from_features(self, feats: Tensor) -> Tensor:
        """Cached backbone features (B, F, P, C) -> video tokens (B, L, d_llm)."""
        return self.tokens_from_queries(self.video_queries_from_features(feats))

    def video_tokens(self, frames: Tensor) -> Tensor:
        """(B, F, 3, H, W) in [0, 1] -> video tokens X (B, L, d_llm)."""
        return self.video_tokens_from_features(self.frame_features(frames))

    def loss_from_features(self, feats: Tensor, instructions: list[str], answers: list[str]) -> Tensor:
        """Captioning cross-entropy on the answer tokens, through the frozen LLM."""
        return self.loss_from_tokens(self.video_tokens_from_features(feats), instructions, answers)

    def loss_from_tokens(self, tokens: Tensor, instructions: list[str], answers: list[str]) -> Tensor:
        """Captioning cross-entropy given video tokens (B, L, d_llm)."""
        embeds, mask, labels = llm_mod.build_prompt_embeds(
            self.llm, self.tokenizer, tokens, instructions, answers, system=self.system)
        return llm_mod.answer_loss(self.llm, embeds, mask, labels,
                                   llm_mod.prefix_length(self.tokenizer, self.system))

    @torch.no_grad()
    def answer_from_tokens(self, tokens: Tensor, instructions: list[str], **gen) -> list[str]:
        """Answers given video tokens (B, L, d_llm); ``gen`` as in :func:`generation.generate`."""
        return generation.generate(self.llm, self.tokenizer, tokens, instructions,
                                   system=self.system, **gen)

    @torch.no_grad()
    def answer_from_features(self, feats: Tensor, instructions: list[str], **gen) -> list[str]:
        """Video2Text from cached backbone features (B, F, P, C)."""
        return self.answer_from_tokens(self.video_tokens_from_features(feats), instructions, **gen)

    @torch.no_grad()
    def answer(self, frames: Tensor, instructions: list[str], **gen) -> list[str]:
        """Video2Text: the LLM's answers about each clip (batched, greedy or seeded)."""
        return self.answer_from_features(self.frame_features(frames), instructions, **gen)

    # -- checkpoints hold the trainable part only
    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Parameters of the trainable modules, detached, fp32, contiguous."""
        return {k: v.detach().float().contiguous() for k, v in self.state_dict().items()
                if k.startswith(TRAINABLE)}

    def load_trainable_state_dict(self, state: dict[str, Tensor], source: str = "checkpoint") -> None:
        """Load a :meth:`trainable_state_dict`; refuse missing, unexpected or mis-shaped keys."""
        own = self.trainable_state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = sorted(f"{k}: {tuple(state[k].shape)} != {tuple(v.shape)}"
                        for k, v in own.items() if k in state and state[k].shape != v.shape)
        if missing or unexpected or shapes:
            parts = [f"{name}: {', '.join(keys[:8])}{' …' if len(keys) > 8 else ''}"
                     for name, keys in (("missing", missing), ("unexpected", unexpected),
                                        ("wrong shape", shapes)) if keys]
            raise UserError("teacher checkpoint does not match the configured teacher ("
                            + "; ".join(parts) + ")", path=source,
                            fix="use the teacher config the checkpoint was trained with, "
                                "or retrain it (fmri2text teacher fit)")
        self.load_state_dict(state, strict=False)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if n.startswith(TRAINABLE)]


def build_teacher(backbone: nn.Module, llm: nn.Module, tokenizer, bert: nn.Module | None, *,
                  image_queries: int = 32, image_layers: int = 2, video_queries: int = 32,
                  video_layers: int = 2, max_frames: int = 32, cross_attention_frequency: int = 1,
                  token_norm: bool = True, system: str | None = None,
                  hidden: int | None = None, heads: int | None = None, seed: int = 0,
                  projector: str = "linear", projector_hidden: int = 1024,
                  ) -> VideoLLaMATeacher:
    """Assemble a teacher; Q-Former sizes follow ``bert`` (whose weights initialise them).

    With ``bert=None`` the Q-Formers are random with ``hidden``/``heads`` (default 64/4).
    """
    if bert is not None:
        bc = bert.config
        hidden, heads, inter = bc.hidden_size, bc.num_attention_heads, bc.intermediate_size
        n_bert = bc.num_hidden_layers
        if image_layers > n_bert or video_layers > n_bert:
            raise UserError(f"Q-Former layers ({image_layers}, {video_layers}) exceed the "
                            f"{n_bert} layers of the BERT used to initialise them",
                            fix=f"set teacher.image_layers and teacher.video_layers <= {n_bert}")
    else:
        hidden, heads = hidden or 64, heads or 4
        inter = hidden * 4
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        iq = QFormer(image_queries, hidden, image_layers, heads, inter, backbone.width,
                     cross_attention_frequency)
        vq = QFormer(video_queries, hidden, video_layers, heads, inter, hidden, 1)
        if bert is not None:
            iq.init_from_bert(bert)
            vq.init_from_bert(bert)
        teacher = VideoLLaMATeacher(backbone, llm, tokenizer, iq, vq, max_frames, token_norm, system,
                                    projector, projector_hidden)
    return teacher


def n_params(module: nn.Module, trainable: bool | None = None) -> int:
    """Parameter count (all, or only trainable / frozen)."""
    return sum(p.numel() for p in module.parameters()
               if trainable is None or p.requires_grad == trainable)


#: Named real-size teachers: field values applied over fields left at their default.
PRESETS: dict[str, dict] = {
    "embedded": {},
    # Video-LLaMA-2 (7B): EVA ViT-g + BLIP-2 image Q-Former (12 layers, cross-attention every
    # 2nd, 32 queries) -> 2-layer video Q-Former (32 queries) -> llama_proj -> LLaMA-2-7B-chat.
    "videollama2-7b": dict(vision="eva-vit-g", image_size=224, n_frames=8, bert="none",
                           qformer_hidden=768, qformer_heads=12, image_queries=32, image_layers=12,
                           video_queries=32, video_layers=2, max_frames=32,
                           cross_attention_frequency=2, token_norm=False, system_prompt="",
                           projector="linear", itc_steps=0),  # the published Q-Formers are already aligned
}
VISION_EVA = "eva-vit-g"


def resolve_preset(tcfg):
    """A copy of ``tcfg`` (config.TeacherConfig) with its preset applied.

    Every field the preset names and that still holds the dataclass default takes the
    preset's value; fields set to anything else keep the user's value.
    """
    import dataclasses

    if tcfg.preset not in PRESETS:
        raise UserError(f"unknown teacher preset teacher.preset={tcfg.preset!r}",
                        fix=f"use one of {', '.join(PRESETS)}")
    defaults = {f.name: f.default for f in dataclasses.fields(type(tcfg))}
    values = {k: v for k, v in PRESETS[tcfg.preset].items() if getattr(tcfg, k) == defaults[k]}
    return dataclasses.replace(tcfg, **values)


def check_weight_files(tcfg) -> None:
    """Refuse (UserError naming the file) a configured weight file that is not on disk.

    Run before anything heavy loads; ``tcfg`` must be preset-resolved.
    """
    def need(value: str, key: str, what: str, marker: str | None = None) -> None:
        path = Path(value).expanduser()
        if not value:
            raise UserError(f"teacher.preset={tcfg.preset} needs {what}", fix=f"set {key}=/path/to/it")
        if not path.exists() or (marker and path.is_dir() and not (path / marker).is_file()):
            missing = path / marker if marker and path.is_dir() else path
            raise UserError(f"{what} not found", path=missing,
                            fix=f"download it and set {key} to its path")

    real = tcfg.preset != "embedded"
    if real and tcfg.llm == "smollm2":
        raise UserError(f"teacher.preset={tcfg.preset} needs a local LLaMA-2-7B-chat / Vicuna folder",
                        fix="set teacher.llm=/path/to/Llama-2-7b-chat-hf (config.json, weights, tokenizer)")
    if tcfg.llm != "smollm2":
        need(tcfg.llm, "teacher.llm", "the LLM folder", "config.json")
    if real or tcfg.vision == VISION_EVA or tcfg.blip2_checkpoint:
        need(tcfg.blip2_checkpoint, "teacher.blip2_checkpoint", "the BLIP-2 checkpoint (EVA ViT-g + Q-Former)")
    if real or tcfg.videollama_checkpoint:
        need(tcfg.videollama_checkpoint, "teacher.videollama_checkpoint",
             "the Video-LLaMA-2 vision-language checkpoint")


def teacher_from_config(tcfg, *, llm=None, tokenizer=None) -> VideoLLaMATeacher:
    """Build the configured teacher from the offline zoo (``tcfg``: config.TeacherConfig).

    ``llm``/``tokenizer`` may be passed to share an already loaded LLM. The preset is
    applied first; configured BLIP-2 / Video-LLaMA checkpoints are imported (explicit key
    maps, :mod:`fmri2text.models.import_blip2`) after the teacher is assembled.
    """
    from fmri2text.models import import_blip2, zoo

    tcfg = resolve_preset(tcfg)
    check_weight_files(tcfg)
    if llm is None:
        llm, tokenizer = llm_mod.load_llm(tcfg.llm, tcfg.llm_dtype)
    if tcfg.vision == VISION_EVA:
        backbone = import_blip2.build_blip2_vision(tcfg.blip2_checkpoint, tcfg.image_size)
    else:
        backbone = zoo.load_vision_backbone(tcfg.vision, tcfg.image_size)
    bert = None if tcfg.bert == "none" else zoo.load_bert(tcfg.bert)
    teacher = build_teacher(backbone, llm, tokenizer, bert, image_queries=tcfg.image_queries,
                            image_layers=tcfg.image_layers, video_queries=tcfg.video_queries,
                            video_layers=tcfg.video_layers, max_frames=tcfg.max_frames,
                            cross_attention_frequency=tcfg.cross_attention_frequency,
                            token_norm=tcfg.token_norm, system=tcfg.system_prompt or None,
                            hidden=tcfg.qformer_hidden or None, heads=tcfg.qformer_heads or None,
                            seed=tcfg.seed, projector=tcfg.projector,
                            projector_hidden=tcfg.projector_hidden)
    if tcfg.blip2_checkpoint:
        import_blip2.import_blip2(tcfg.blip2_checkpoint, teacher)
    if tcfg.videollama_checkpoint:
        import_blip2.import_videollama(tcfg.videollama_checkpoint, teacher)
    return teacher
