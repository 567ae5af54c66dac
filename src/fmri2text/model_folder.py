"""The decoder folder: what :class:`fmri2text.api.Decoder` saves and loads.

A decoder folder (format ``fmri2text-decoder``, version :data:`FORMAT_VERSION`) holds::

    config.json          what rebuilds the student, names its frozen LLM and teacher, the
                         preprocessing settings and fitted state, generation settings, and
                         the sha256 of each file below
    student.safetensors  the trained student (tokenizer, encoder + adaptors, projector)
    mask.npy             the fitted brain mask: (n_grid,) bool, C order (no pickle)
    README.md            the model card: training data, splits, metrics with controls, scorer

Loading reads only these files, with JSON, ``np.load(allow_pickle=False)`` and safetensors:
nothing in the folder is executed, other files (``*.pkl``, ``*.bin``, …) are never opened, and
the LLM is loaded from its own location (``config.json`` names it and records its hash).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from fmri2text import __version__
from fmri2text.errors import UserError

FORMAT = "fmri2text-decoder"
#: Version of the folder layout this fmri2text writes; it reads this version and older ones.
FORMAT_VERSION = 1
CONFIG_FILE, STUDENT_FILE, MASK_FILE, CARD_FILE = ("config.json", "student.safetensors",
                                                     "mask.npy", "README.md")
#: the folder's files whose sha256 ``config.json`` records and loading checks
CHECKED_FILES = (STUDENT_FILE, MASK_FILE)
_SECTIONS = ("student", "llm", "teacher", "preprocessing", "generation", "files")
REEXPORT = "re-export it (fmri2text run, or fmri2text.export.export_run_model) or copy it again"


def content_sha256(path: Path) -> str:
    """sha256 of a file's content. For safetensors: of its metadata and tensors in sorted
    order, since the file's header order (a hash map's) differs from one save to the next."""
    from fmri2text.models.llm import file_digest

    if path.suffix != ".safetensors":
        return file_digest(path)
    from safetensors import safe_open

    h = hashlib.sha256()
    try:
        with safe_open(str(path), framework="pt") as f:
            h.update(json.dumps(f.metadata() or {}, sort_keys=True).encode())
            for name in sorted(f.keys()):
                t = f.get_tensor(name)
                h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
                h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's to replace
        raise UserError(f"not a readable safetensors file ({type(err).__name__}: {err})",
                        path=path, fix=REEXPORT) from None
    return h.hexdigest()


def llm_identity(name: str) -> dict:
    """The frozen LLM's name and a sha256 over its weight and tokenizer files.

    ``"smollm2"`` is identified by its GGUF (the file llm.py converts and keys its cache on);
    a local folder by its ``*.safetensors``/``*.gguf``/``*.bin`` weights and tokenizer files.
    """
    from fmri2text.models import llm as llm_mod
    from fmri2text.models.zoo import smollm2_gguf_path

    if name == "smollm2":
        path = smollm2_gguf_path()
        return {"name": name, "sha256": llm_mod.file_digest(path), "files": [path.name]}
    folder = Path(name).expanduser()
    patterns = ("*.safetensors", "*.gguf", "*.bin", "tokenizer.json", "tokenizer.model",
                "tokenizer_config.json")
    files = sorted({p for pat in patterns for p in folder.glob(pat) if p.is_file()})
    if not files:
        raise UserError("no weight files in the LLM folder", path=folder,
                        fix="point teacher.llm (or llm=) at a transformers model folder")
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}:{llm_mod.file_digest(p)}\n".encode())
    return {"name": name, "sha256": h.hexdigest(), "files": [p.name for p in files]}


def student_metadata(path: Path) -> tuple[dict[str, str], dict]:
    """(raw safetensors metadata, the same JSON-decoded) of a student file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = dict(f.metadata() or {})
        decoded = {k: (v if k == "format" else json.loads(v)) for k, v in raw.items()}
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's to replace
        raise UserError(f"not a safetensors student file ({type(err).__name__}: {err})",
                        path=path, fix=REEXPORT) from None
    if raw.get("format") != "fmri2text-student":
        raise UserError(f"not an fmri2text student (metadata format {raw.get('format')!r})",
                        path=path, fix=REEXPORT)
    return raw, decoded


def read_config(folder: Path) -> dict:
    """``config.json`` of a decoder folder, checked for format, version and sections."""
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise UserError("decoder folder not found", path=folder,
                        fix="pass the folder written by save_pretrained or fmri2text run (RUN/model)")
    if not path.is_file():
        raise UserError("not a decoder folder: config.json is missing", path=path,
                        fix="pass the folder written by save_pretrained or fmri2text run "
                            f"(RUN/model), or {REEXPORT}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"config.json is not valid JSON ({err})", path=path, fix=REEXPORT) from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else None
        raise UserError(f"not an fmri2text decoder config (format {found!r})", path=path,
                        fix=REEXPORT)
    version = config.get("format_version")
    if type(version) is not int or version < 1:
        raise UserError(f"format_version {version!r} is not a positive integer", path=path,
                        fix=REEXPORT)
    if version > FORMAT_VERSION:
        raise UserError(f"written by a newer fmri2text ({config.get('fmri2text_version', '?')}, "
                        f"format version {version}); this fmri2text {__version__} reads format "
                        f"versions up to {FORMAT_VERSION}", path=path,
                        fix="upgrade fmri2text (pip install -U fmri2text)")
    missing = [s for s in _SECTIONS if not isinstance(config.get(s), dict)]
    missing += [f"files.{n}" for n in CHECKED_FILES
                if "files" not in missing and n not in config["files"]]
    if missing:
        raise UserError(f"config.json lacks {missing}", path=path, fix=REEXPORT)
    for name in CHECKED_FILES:
        if not (folder / name).is_file():
            raise UserError(f"{name} is missing from the decoder folder", path=folder / name,
                            fix=REEXPORT)
    return config

