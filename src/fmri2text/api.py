"""The Python API: a trained decoder as one folder, loaded and used in a few lines.

::

    from fmri2text import Decoder

    decoder = Decoder.from_pretrained("runs/demo/model")
    texts = decoder.decode("sub-05_task-action_run-01_bold.nii.gz",
                           events="sub-05_task-action_run-01_events.tsv")

The folder's format (``fmri2text-decoder``) and how loading checks it:
:mod:`fmri2text.model_folder`. ``fmri2text run`` exports its final decoder to ``RUN/model``
with :func:`fmri2text.export.export_run_model`; ``fmri2text decode`` decodes through the
same :class:`Decoder`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from fmri2text import __version__
from fmri2text.config import Config, PipelineConfig
from fmri2text.data.preprocessing import Preprocessing, Trials
from fmri2text.errors import UserError
from fmri2text.io import file_hash, write_json, write_safetensors, write_text
from fmri2text.model_card import usage_card
from fmri2text.model_folder import (CARD_FILE, CHECKED_FILES, CONFIG_FILE, FORMAT,
                                    FORMAT_VERSION, MASK_FILE, REEXPORT, STUDENT_FILE,
                                    content_sha256, llm_identity, read_config, student_metadata)

def _decoding_choice(run: Path, student_path: Path, cfg: Config) -> dict:
    """The decoding that ``fmri2text decode`` chose on validation trials (``RUN/decode.json``),
    as generation settings; empty when there is none for this student and these settings."""
    try:
        record = json.loads((run / "decode.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    choice = record.get("decoding_choice") if isinstance(record, dict) else None
    if not (cfg.pipeline.decode_choose and choice
            and record.get("student_hash") == file_hash(student_path)
            and record.get("pipeline") == dataclasses.asdict(cfg.pipeline)):
        return {}
    return {"samples": int(choice["chosen"]["samples"]),
            "mbr_beta": float(choice["chosen"]["mbr_beta"]),
            "rerank": float(choice["chosen"].get("rerank", 0.0)),
            "deep_gain": float(choice["chosen"].get("deep_gain", 1.0))}


class Decoder:
    """A trained fMRI → text decoder: preprocessing, student, frozen LLM and generation settings.

    Build one with :meth:`from_pretrained` (a saved folder) or :meth:`from_run` (a run
    directory); :meth:`decode` turns one run's BOLD and its trials into one text per trial.

    Parameters
    ----------
    student : fmri2text.models.student.Student
        The trained student (its weights are used as they are; it is put in eval mode).
    student_meta : dict
        The student file's metadata (``format``, ``input_shape``, ``d_llm``, ``n_tokens``,
        ``spec``, ``encoder``, ``adapted``, ``extra``) as strings, as safetensors stores it.
    preprocessing : fmri2text.data.preprocessing.Preprocessing
        The data settings and fitted mask that turn a run into the student's input.
    llm : dict
        ``name`` (``"smollm2"`` or a local folder), ``dtype``, and optionally ``sha256``
        (checked when the LLM is loaded, see :func:`llm_identity`).
    generation : dict
        ``instruction`` (the default), ``max_new_tokens``, ``greedy``, ``seed``,
        ``batch_size``, ``system`` (the chat system prompt, or None), and for MBR decoding
        ``samples``, ``temperature``, ``top_p``, ``mbr_beta`` and ``rerank`` (see
        :func:`fmri2text.models.generation.generate`).
    teacher : dict, optional
        The teacher the student was trained against (recorded, not needed to decode).
    card : str, optional
        The model card (README.md) text.
    training : dict, optional
        What it was trained and evaluated on (``run``, ``heldout_subjects``, ``test_runs``:
        the held-out test runs' ``subject``, ``bold`` and ``events`` paths).
    device : str or torch.device
        Where the student and the LLM run.
    source : path, optional
        The student's file, named in error messages.
    """

    def __init__(self, student, student_meta: dict, preprocessing: Preprocessing, llm: dict,
                 generation: dict, teacher: dict | None = None, card: str | None = None,
                 training: dict | None = None, device: str | torch.device = "cpu",
                 source: str | Path | None = None):
        self.source = None if source is None else Path(source)
        self.device = torch.device(device)
        self.student = student.to(self.device).eval()
        self.student_meta = dict(sorted(student_meta.items()))
        self.preprocessing = preprocessing
        self.llm_info = dict(llm)
        self.generation = dict(generation)
        self.teacher = dict(teacher or {})
        self.card = card
        self.training = dict(training or {})
        self._llm = None
        self._sentence = None  # the sentence encoder of the semantic head, loaded on first use
        shape = tuple(json.loads(self.student_meta["input_shape"]))
        if shape != preprocessing.input_shape:
            raise UserError(f"the student reads windows of shape {shape}, the data gives "
                            f"{preprocessing.input_shape}", path=self.source,
                            fix="decode the dataset it was trained on, or retrain on this one")

    # ------------------------------------------------------------------------- building

    @classmethod
    def from_run(cls, run: str | Path, cfg: Config, *, feature_mask: np.ndarray | None = None,
                 grid: Sequence[int] | None = None, affine: np.ndarray | None = None,
                 device: str | torch.device = "cpu") -> "Decoder":
        """The Stage II decoder of a run directory, with ``cfg``'s data and decoding settings.

        Parameters
        ----------
        run : path
            The run directory (``RUN/stage2/student.safetensors``, ``RUN/teacher``).
        cfg : Config
            The run's config (checked against the student, as ``fmri2text decode`` does).
        feature_mask, grid, affine : optional
            The brain mask the windows were extracted with; by default the prepared store's
            (``RUN/prepared/mask.npy``, its manifest's grid, ``mask.nii.gz``'s affine).
        device : str or torch.device
            Where the student and the LLM run.
        """
        from fmri2text.steps import teacher_checkpoint
        from fmri2text.training.stage1 import load_student
        from fmri2text.training.stage2 import check_student

        run = Path(run)
        student_path = check_student(run, cfg)
        raw, _ = student_metadata(student_path)
        student, _ = load_student(student_path)
        if feature_mask is None:
            prep = Preprocessing.from_prepared(run / "prepared", cfg.data)
        else:
            prep = Preprocessing(cfg.data, np.asarray(feature_mask, bool),
                                 None if grid is None else tuple(int(g) for g in grid),
                                 None if affine is None else np.asarray(affine, np.float64))
        _, digest = teacher_checkpoint(run, cfg)
        p = cfg.pipeline
        generation = {"instruction": cfg.evaluation.instruction,
                      "max_new_tokens": p.decode_max_new_tokens, "greedy": p.decode_greedy,
                      "seed": cfg.evaluation.seed, "batch_size": p.decode_batch_size,
                      "system": cfg.teacher.system_prompt or None, "samples": p.decode_samples,
                      "temperature": p.decode_temperature, "top_p": p.decode_top_p,
                      "mbr_beta": p.decode_mbr_beta, "rerank": p.decode_rerank,
                      "deep_gain": p.decode_deep_gain}
        generation.update(_decoding_choice(run, student_path, cfg))
        teacher = {"checkpoint_hash": digest, "config": dataclasses.asdict(cfg.teacher)}
        return cls(student, raw, prep, {"name": cfg.teacher.llm, "dtype": cfg.teacher.llm_dtype},
                   generation, teacher, device=device, source=student_path)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, llm: str | None = None,
                        device: str | torch.device = "cpu", check_llm: bool = True) -> "Decoder":
        """Load a decoder folder written by :meth:`save_pretrained` (or ``fmri2text run``).

        Parameters
        ----------
        path : path
            The folder (e.g. ``RUN/model``).
        llm : str, optional
            Where the frozen LLM is on this machine (``"smollm2"`` or a local folder), when
            not where ``config.json`` names it; its hash must still match.
        device : str or torch.device
            Where the student and the LLM run.
        check_llm : bool
            Compare the LLM's files with the sha256 recorded at export (reads the weights
            once when the LLM is first loaded).

        Raises
        ------
        UserError
            A missing or altered file, a config written by a newer fmri2text, a student
            or mask that does not fit the config — naming the file and the fix.
        """
        from fmri2text.training.stage1 import load_student

        folder = Path(path)
        config = read_config(folder)
        others = sorted(p.name for p in folder.iterdir()
                        if p.name not in (CONFIG_FILE, CARD_FILE, *CHECKED_FILES))
        if others:  # never opened: only the format's own files are read
            warnings.warn(f"{folder}: ignored files that are not part of a decoder folder "
                          f"(never loaded): {others}", stacklevel=2)
        prep = Preprocessing.from_json(config["preprocessing"], folder / MASK_FILE)
        student_path = folder / STUDENT_FILE
        raw, decoded = student_metadata(student_path)
        differ = [k for k in sorted(set(decoded) | set(config["student"]))
                  if decoded.get(k) != config["student"].get(k)]
        if differ:
            k = differ[0]
            raise UserError(f"the student file does not fit config.json: {k} is "
                            f"{decoded.get(k)!r} in the file, {config['student'].get(k)!r} in "
                            "config.json", path=student_path, fix=REEXPORT)
        student, _ = load_student(student_path)  # keys and shapes checked before copying
        for name in CHECKED_FILES:
            if content_sha256(folder / name) != config["files"][name]:
                raise UserError(f"{name} differs from the file config.json records (sha256)",
                                path=folder / name, fix=REEXPORT)
        llm_info = dict(config["llm"])
        if llm is not None:
            llm_info["name"] = str(llm)
        if not check_llm:
            llm_info.pop("sha256", None)
        card = folder / CARD_FILE
        return cls(student, raw, prep, llm_info, config["generation"], config["teacher"],
                   card.read_text(encoding="utf-8") if card.is_file() else None,
                   config.get("training"), device=device, source=student_path)

    def config(self) -> dict:
        """The ``config.json`` content (without the file hashes)."""
        return {"format": FORMAT, "format_version": FORMAT_VERSION,
                "fmri2text_version": __version__,
                "student": {k: (v if k == "format" else json.loads(v))
                            for k, v in self.student_meta.items()},
                "llm": self.llm_info, "teacher": self.teacher,
                "preprocessing": self.preprocessing.to_json(), "generation": self.generation,
                "training": self.training}

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the decoder folder (see the module docstring); replaces ``path`` atomically.

        The folder is written beside ``path`` and renamed onto it when complete, so a reader
        sees the old decoder or the new one, never a mix. Returns ``path``.
        """
        path = Path(path)
        if path.exists() and not (path / CONFIG_FILE).is_file() and any(path.iterdir()):
            raise UserError("the folder is not empty and holds no decoder: not overwritten",
                            path=path, fix="save to a new or empty folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            tensors = {k: v.detach().cpu().contiguous() for k, v in self.student.state_dict().items()}
            write_safetensors(tmp / STUDENT_FILE, tensors, self.student_meta)
            self.preprocessing.save_mask(tmp / MASK_FILE)
            config = self.config()
            config["files"] = {name: content_sha256(tmp / name) for name in CHECKED_FILES}
            write_json(tmp / CONFIG_FILE, config)
            write_text(tmp / CARD_FILE, self.card or usage_card(config))
            old = path.parent / f".old-{path.name}-{os.getpid()}"
            if path.exists():
                os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        except OSError as err:
            raise UserError(f"cannot write the decoder folder: {err.strerror}", path=path,
                            fix="choose a folder you can write to, with free space") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path

    # ------------------------------------------------------------------------- decoding

    def windows(self, bold, events: str | Path | None = None,
                onsets: Sequence[float] | None = None, tr: float | None = None) -> Trials:
        """One run's trials and their windows, preprocessed exactly as in training.

        Parameters
        ----------
        bold : path or nibabel image
            One run: a 4-D NIfTI (or CIFTI dtseries) on the decoder's grid.
        events : path, optional
            Its BIDS ``*_events.tsv`` (rows with ``stim_file`` n/a are skipped; onsets get
            the dataset's offset rule, ``data.onset_offset``, as in training).
        onsets : sequence of float, optional
            Trial onsets in seconds from the start of the scan, instead of ``events``.
        tr : float, optional
            Repetition time in seconds; by default the BOLD JSON sidecar's, else the header's.

        Returns
        -------
        fmri2text.data.preprocessing.Trials
            ``table`` (one row per trial, in the events file's order) and ``data``
            (n, T, F) float32 windows over the decoder's mask.
        """
        return self.preprocessing.windows(bold, events=events, onsets=onsets, tr=tr)

    @torch.no_grad()
    def fmri_tokens(self, data: np.ndarray, rows: Sequence[int] | None = None,
                    batch_size: int | None = None, offsets: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """Student output Z (n, L, d_llm) float32 for windows ``data[rows]`` (n, T, F), with
        the deep path weighed by the generation setting ``deep_gain``. ``offsets`` (n, L, d):
        per-trial offsets of the linear path (:meth:`alignment`), applied at its gain."""
        out = [self.tokens(x).float().cpu() for _, x in self._inputs(data, rows, batch_size)]
        z = torch.cat(out) if out else torch.zeros(0, self.n_tokens, self.d_llm)
        return z if offsets is None else self.student.cross_fitted(z, offsets)

    def alignment(self, data: np.ndarray, rows: Sequence[int], subjects: Sequence[str],
                  adapt_rows: Sequence[int], adapt_subjects: Sequence[str],
                  batch_size: int | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Offsets aligning each subject of windows ``data[rows]`` to the training subjects by
        its unlabelled windows among ``data[adapt_rows]`` (CORAL, :mod:`fmri2text.models.
        alignment`): tokens (n, L, d) for :meth:`fmri_tokens`, semantic (n, d_s) or None for
        :meth:`semantic`; (None, None) for a student trained without ``encoder.align_subjects``."""
        from fmri2text.models.alignment import subject_offsets

        linear, enc = self.student.linear, json.loads(self.student_meta.get("encoder", "{}"))
        if linear is None or not enc.get("align_subjects", False) or not (len(rows) and len(adapt_rows)):
            return None, None
        with torch.no_grad():
            h = [torch.cat([linear.components(x).float().cpu()
                            for _, x in self._inputs(data, r, batch_size)]) for r in (rows, adapt_rows)]
        return subject_offsets(linear, h[0], np.asarray(subjects), h[1],
                               np.asarray(adapt_subjects), float(enc["align_shrinkage"]))

    @property
    def deep_gain(self) -> float:
        """Weight of the student's deep path in its tokens (1 for folders saved before it)."""
        return float(self.generation.get("deep_gain", 1.0))

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Z (B, L, d_llm) of the student's input ``x`` (:meth:`_inputs`), at :attr:`deep_gain`."""
        return self.student(x, deep_gain=self.deep_gain)

    def _inputs(self, data: np.ndarray, rows: Sequence[int] | None, batch_size: int | None):
        """(start, x) per batch of windows ``data[rows]``: x the student's input on its device,
        (B, T, X', Y', Z') or (B, T, V)."""
        rows = np.arange(len(data)) if rows is None else np.asarray(rows)
        b = int(batch_size or self.generation["batch_size"])
        crop = self.preprocessing.crop
        for s in range(0, len(rows), b):
            x = torch.from_numpy(np.asarray(data[rows[s:s + b]], dtype=np.float32))  # (B, T, F)
            yield s, (crop(x) if crop is not None else x).to(self.device)

    def embed(self, bold, events: str | Path | None = None, onsets: Sequence[float] | None = None,
              *, pooled: bool = True, tr: float | None = None,
              batch_size: int | None = None, adapt: np.ndarray | None = None) -> np.ndarray:
        """fMRI embeddings of one run's trials, for retrieval.

        Parameters are those of :meth:`windows` (``adapt`` as in :meth:`decode`). With
        ``pooled`` (default) returns the L2-normalised mean of the fMRI tokens, (n, d_llm) —
        what ``RUN/retrieval.npz`` scores against the teacher's pooled video tokens;
        otherwise the tokens Z themselves, (n, L, d_llm).
        """
        data = self.windows(bold, events, onsets, tr).data
        z = self.fmri_tokens(data, batch_size=batch_size,
                             offsets=self._own_alignment(data, adapt, batch_size)[0])
        if pooled:
            z = torch.nn.functional.normalize(z.mean(dim=1), dim=-1)
        return z.numpy()

    def decode(self, bold, events: str | Path | None = None, onsets: Sequence[float] | None = None,
               instruction: str | None = None, batch_size: int | None = None,
               tr: float | None = None, adapt: np.ndarray | None = None) -> list[str]:
        """One text per trial of one run: fMRI → student → frozen LLM (greedy by default).

        Parameters
        ----------
        bold, events, onsets, tr
            As in :meth:`windows`: the run and its trials (``events`` or ``onsets``).
        instruction : str, optional
            What to ask about each trial; default the one the decoder was evaluated with.
        batch_size : int, optional
            Trials per student forward and per batched generation.
        adapt : array, optional
            The same subject's unlabelled windows (``decoder.windows(other_run, …).data``): the
            subject is first aligned to the training subjects by them (:meth:`alignment`), as
            the run's held-out subjects were by their adapt trials. None: unaligned.

        Returns
        -------
        list of str
            One answer per trial, in the order of :meth:`windows`' table.
        """
        instruction = self.generation["instruction"] if instruction is None else instruction
        if not str(instruction).strip():
            raise UserError("the instruction is empty", fix="pass instruction='Describe the video.'")
        data = self.windows(bold, events, onsets, tr).data
        tok_off, sem_off = self._own_alignment(data, adapt, batch_size)
        z = self.fmri_tokens(data, batch_size=batch_size, offsets=tok_off)
        return self.generate(z, [instruction] * len(z), batch_size=batch_size,
                             semantic=self.semantic(data, batch_size=batch_size, offsets=sem_off))

    def _own_alignment(self, data: np.ndarray, adapt: np.ndarray | None, batch_size: int | None):
        """:meth:`alignment` of one subject's windows by its unlabelled ``adapt`` ones (None: none)."""
        if adapt is None:
            return None, None
        n, m = len(data), len(adapt)
        both = np.concatenate([np.asarray(data, np.float32), np.asarray(adapt, np.float32)])
        return self.alignment(both, range(n), ["s"] * n, range(n, n + m), ["s"] * m, batch_size)

    def semantic(self, data: np.ndarray, rows: Sequence[int] | None = None,
                 batch_size: int | None = None, offsets: torch.Tensor | None = None
                 ) -> torch.Tensor | None:
        """The semantic head's predictions (n, d_s) for windows ``data[rows]`` as unit-length
        directions from the training answers' mean (comparable with :meth:`embed_answers`),
        or None when the student has none. ``offsets`` (n, d_s): Stage I's cross-fitting
        offsets of training trials (validation), or :meth:`alignment`'s."""
        linear = self.student.linear
        if linear is None or not linear.semantic_dim:
            return None
        out = []
        with torch.no_grad():
            for s, x in self._inputs(data, rows, batch_size):
                off = None if offsets is None else offsets[s:s + len(x)].to(self.device)
                out.append(linear.semantic(x, off).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, linear.semantic_dim)

    def embed_answers(self, texts: list[str]) -> np.ndarray:
        """(n, d_s) unit-length directions of ``texts``' sentence embeddings from the training
        answers' mean (the semantic head's intercept): the space in which MBR's candidates
        meet :meth:`semantic`'s predictions. Requires a semantic head."""
        centre = self.student.linear.semantic_centre.float().cpu().numpy()
        d = self.embed_texts(texts) - centre
        return d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """(n, d_s) unit-length sentence embeddings of ``texts`` (the embedded MiniLM, the
        semantic head's target space); each distinct text is encoded once per decoder."""
        if self._sentence is None:
            from fmri2text.models.sentence import SentenceEmbedder

            self._sentence = (SentenceEmbedder(), {})
        encoder, seen = self._sentence
        new = sorted({t for t in texts if t not in seen})
        if new:
            seen.update(zip(new, np.asarray(encoder.encode(new), dtype=np.float32)))
        return np.stack([seen[t] for t in texts]) if texts else np.zeros((0, 0), np.float32)

    def generate(self, z: torch.Tensor | None, instructions: list[str],
                 batch_size: int | None = None, semantic: torch.Tensor | None = None,
                 **overrides) -> list[str]:
        """Answers of the frozen LLM given fMRI tokens ``z`` (n, L, d) — or None: its prior.

        ``semantic`` (n, d_s): the semantic head's embeddings of the same trials, which MBR
        decoding weighs its candidates by (generation setting ``rerank``). ``overrides``:
        generation settings for this call (e.g. ``rerank=0.0``).
        """
        from fmri2text.models.generation import generate

        model, tokenizer = self.llm()
        kwargs = {**self.generation_kwargs(), **({"batch_size": int(batch_size)} if batch_size else {}),
                  **overrides}
        return generate(model, tokenizer, z, list(instructions), semantic=semantic,
                        embed=self.embed_answers if semantic is not None else None, **kwargs)

    def generation_kwargs(self) -> dict:
        """Keyword arguments of :func:`fmri2text.models.generation.generate` (all but the inputs)."""
        g, d = self.generation, PipelineConfig()
        return {"max_new_tokens": int(g["max_new_tokens"]), "greedy": bool(g["greedy"]),
                "seed": int(g["seed"]), "batch_size": int(g["batch_size"]),
                "system": g.get("system") or None,
                # folders exported before MBR decoding: one answer, as they were evaluated
                "samples": int(g.get("samples", 0)),
                "temperature": float(g.get("temperature", d.decode_temperature)),
                "top_p": float(g.get("top_p", d.decode_top_p)),
                "mbr_beta": float(g.get("mbr_beta", d.decode_mbr_beta)),
                "rerank": float(g.get("rerank", 0.0))}

    def llm(self):
        """The frozen LLM and its tokenizer, loaded (and checked) on first use."""
        if self._llm is None:
            from fmri2text.models import llm as llm_mod

            info = self.llm_info
            if info.get("sha256"):
                found = llm_identity(info["name"])["sha256"]
                if found != info["sha256"]:
                    raise UserError(
                        f"the LLM {info['name']!r} is not the one the decoder was trained with "
                        f"(sha256 {found[:16]}…, recorded {info['sha256'][:16]}…)",
                        path=info["name"], fix="pass llm= the folder of the LLM it was trained "
                                               "with (see README.md), or check_llm=False")
            model, tokenizer = llm_mod.load_llm(info["name"], info.get("dtype", "auto"))
            width = model.get_input_embeddings().weight.shape[1]
            if width != self.d_llm:
                raise UserError(f"the student outputs width {self.d_llm}, the LLM "
                                f"{info['name']!r} is {width} wide", path=self.source,
                                fix="use the LLM of the teacher it was trained against "
                                    "(teacher.llm)")
            self._llm = (model.to(self.device), tokenizer)
        return self._llm

    @property
    def d_llm(self) -> int:
        """Width of the fMRI tokens (the LLM's embedding width)."""
        return int(self.student_meta["d_llm"])

    @property
    def n_tokens(self) -> int:
        """L, the number of fMRI tokens per trial."""
        return int(self.student_meta["n_tokens"])

    def __repr__(self) -> str:
        return f"Decoder(input {self.preprocessing.input_shape}, {self.n_tokens} x {self.d_llm} tokens)"
