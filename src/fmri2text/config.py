"""Typed configuration: dataclasses, YAML files, dotted command-line overrides.

One :class:`Config` holds every setting of a run. It is built from defaults, then a YAML
file (``--config``), then ``section.key=value`` overrides, and is validated at each step:
an unknown key is an error that lists the valid keys, a wrong type names the expected one.
The resolved config is written into every run directory (``config.yaml``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fmri2text.config_parse import apply, dotted_keys, nest, parse_override
from fmri2text.errors import UserError

INSTRUCTIONS = [
    "What is the main thing happening in the video?",
    "Describe the video.",
    "What is happening in this video?",
    "Briefly describe what you see in the video.",
]


@dataclass
class SimulateConfig:
    """The video-fMRI simulator (DESIGN §3): a BIDS dataset in HAD's layout."""

    subjects: int = 6
    # HAD: 12 (each block of 3 runs shows every class once when classes=180); 3 fits the
    # demo's 15-minute CPU budget (annotation scales with the clips; at 2, p > 0.01: BENCHMARKS)
    runs: int = 3
    classes: int = 24  # HAD: 180
    seed: int = 0
    resolution: float = 4.0  # mm, MNI grid (HAD native is 2 mm)
    cnr_scale: float = 1.0  # multiplies HAD's measured contrast-to-noise ratios
    web_clips: int = 240  # disjoint captioned clips for teacher pretraining
    clip_seconds: float = 2.0
    fps: int = 8
    frame_size: int = 64  # pixels, square
    volumes_per_run: int = 156  # HAD
    tr: float = 2.0  # HAD, seconds


@dataclass
class DataConfig:
    """How trials are read from a BIDS dataset and turned into per-trial responses."""

    task: str = "action"
    space: str = "raw"  # raw | fmriprep | cifti
    hrf_delay: float = 4.0  # seconds after onset where the response window starts
    window: int = 2  # volumes per trial window (T)
    aggregate: str = "mean"  # mean: (n_trials, n_features) | stack: (n_trials, window, n_features)
    response: str = "window"  # window (mean/stack of volumes) | lsa | lss (single-trial betas, data/betas.py)
    hrf_model: str = "glover"  # HRF of lsa/lss trial regressors: glover | spm (nilearn)
    high_pass: float = 0.01  # Hz, cosine drift regressors
    standardize: bool = True  # z-score each voxel within its run
    smoothing_fwhm: float = 9.0  # mm, Gaussian smoothing of the student's windows in the mask; 0 = none
    captions: str = "derivatives/simulation/captions.json"  # relative to the dataset root
    max_bad_voxel_fraction: float = 0.05  # NaN/constant voxels above this are fatal
    # layout of the dataset (data/bids.py); task may list several: "train,test"
    bold_dir: str = ""  # BOLD folder relative to the root: "" = raw func/, e.g. derivatives/fmriprep
    bold_space: str = ""  # space- entity of the BOLD files (MNI152NLin2009cAsym, fsLR); "" = none
    onset_offset: float = 12.0  # seconds added to a run's onsets (HAD counts from the first trial)
    onset_offset_below: float = 6.0  # ... only when the run's first onset is below this
    class_source: str = "folder"  # folder (stim_file's folder) | column (class_column) | none
    class_column: str = "trial_type"  # folder: checked class id (HAD 1 + ASCII index); column: name
    group_pattern: str = r"_id_(?P<group>[A-Za-z0-9_-]{11})_start_"  # on stim_file; else own group
    caption_field: str = ""  # field of dict-valued caption entries (BOLD Moments: text_descriptions)
    confounds: list[str] = field(default_factory=list)  # fMRIPrep confound columns to regress out
    workers: int = 0  # runs read in parallel threads; 0 = number of CPU cores
    store_chunk_rows: int = 0  # rows per prepared-store chunk file; 0 = about 16 MiB per chunk


@dataclass
class SplitConfig:
    """Which subjects train and which are held out; held-out trials go to adapt or test."""

    heldout: list[str] = field(default_factory=list)  # subject labels; empty: the last n
    n_heldout: int = 2
    # of held-out stimulus groups, for unlabeled adaptation (0.7: the demo's 2 held-out
    # subjects keep ~55 test trials each, enough for per-subject permutation tests)
    adapt_fraction: float = 0.7
    seed: int = 0
    test_stim_pattern: str = ""  # regex on stim_file: only matching groups may be test (BMD: ^test/)
    overlap: str = "adapt"  # held-out group a training subject saw: adapt (never test) | drop
    # of each training subject's stimulus groups, kept out of Stage I/II fitting to choose
    # their stopping step (validation loss); the held-out subjects are never used for it
    val_fraction: float = 0.1


@dataclass
class BaselineConfig:
    """Ridge regression from fMRI to a sentence embedding of the clip's caption."""

    alphas: list[float] = field(default_factory=lambda: [1e2, 1e3, 1e4, 1e5, 1e6])
    cv_folds: int = 5


@dataclass
class EvaluationConfig:
    """Scoring of decoded text (DESIGN §5)."""

    instruction: str = INSTRUCTIONS[0]
    bertscore_model: str = "minilm"  # 'minilm' (embedded) or a local model folder
    bertscore_layers: int = 6  # layer whose embeddings BERTScore uses
    bertscore_idf: bool = False
    bertscore_rescale: bool = False
    bertscore_baseline: str = ""  # rescale baseline TSV; empty: bert_score's bundled one for the model
    bertscore_batch_size: int = 64  # sentences per BERTScore forward pass
    n_permutations: int = 2000
    seed: int = 0
    # truth of a trial without captions (HAD: the class is its text): 'class' = the template
    # over its class name, 'none' = no truth (vs_truth then has no rows for it)
    truth_without_captions: str = "class"
    class_truth_template: str = "{class_name}"


@dataclass
class LossConfig:
    """Loss weights and temperatures of Stage I and Stage II (DESIGN §2, paper eqs. 1–6)."""

    alpha: float = 0.5  # L2L1: (1-alpha)*||z-x||^2 + alpha*||z-x||_1
    beta: float = 0.5  # Stage I: beta*CLIP + (1-beta)*L2L1
    # Stage II: lambda*CE + (1-lambda)*DA. 0.8: on the demo data 0.5 raised the held-out CE
    # (DA outweighed it), 0.95 left the target features as without DA (BENCHMARKS, λ sweep)
    lambda_: float = 0.8
    tau_clip: float = 0.05  # CLIP temperature (paper 0.05)
    learn_tau: bool = False  # learn the CLIP temperature (log scale, init tau_clip)
    domain_adaptation: bool = True  # DANCE terms in Stage II (false: DA = 0)
    dance_tau: float = 0.5  # neighbourhood-clustering temperature (paper 0.5; DANCE 0.05)
    classifier_temperature: float = 0.05  # cosine classifier g (DANCE 0.05)
    eta: float = 0.05  # weight of NC + ES (DANCE 0.05)
    margin: float = 0.5  # entropy-separation margin m (DANCE 0.5)
    memory_momentum: float = 0.0  # memory bank: new = m*old + (1-m)*feature (DANCE 0.0)
    nc_mask: str = "exclude"  # exclude | min_similarity (DANCE code: masked logits = -1/tau)


@dataclass
class EncoderConfig:
    """The fMRI student encoder (DESIGN §2): tokenizer, SC-MBM ViT, adaptors, projector.

    Size fields left at ``None`` (or an empty list) take their value from ``preset``
    (``tiny`` for tests, ``small`` for the CPU demo, ``mindvis`` = Mind-Vis reference sizes).
    """

    preset: str = "small"  # tiny | small | mindvis
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    decoder_embed_dim: int | None = None
    decoder_depth: int | None = None
    decoder_num_heads: int | None = None
    tokenizer_channels: list[int] = field(default_factory=list)  # one stride-2 conv per entry
    surface_patch: int = 256  # grayordinates per token for surface (CIFTI) input
    target_pool: int = 2  # MBM target: sub-blocks per axis inside each token's cell
    pos_embed: str = "sincos"  # sincos (fixed) | learned
    grad_checkpoint: bool = False  # recompute tokenizer stages and blocks in backward
    token_standardize: bool = True  # standardise each token feature across trials (running stats)
    adapter_rank: int = 8  # 0: no adaptors (ablation; the encoder stays frozen)
    adapter_scale: float = 1.0
    projector_dim: int = 256  # width of the projector's cross-attention
    projector_heads: int = 4
    # linear path: closed-form ridge from the mean response into token space, the deep path
    # residual to it (models/student.py); principal directions kept, 0 = no linear path
    linear_rank: int = 512
    # semantic head on the linear path: ridge from its principal components to the sentence
    # embedding of the teacher's answer (the ridge peer's map); decoding weighs the LLM's
    # sampled answers by agreement with it (pipeline.decode_rerank). Needs linear_rank > 0
    semantic_head: bool = True
    # a held-out subject's linear-path components aligned to the training subjects' by CORAL
    # from its unlabelled trials (models/alignment.py), covariance shrunk toward its diagonal
    align_subjects: bool = True
    align_shrinkage: float = 0.7


@dataclass
class MBMConfig:
    """Masked brain modeling pretraining (MAE on fMRI tokens; Mind-Vis optimiser defaults)."""

    steps: int = 300
    batch_size: int = 8
    lr: float = 2.5e-4
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 20
    mask_ratio: float = 0.75
    clip_grad: float = 0.8  # max gradient norm; 0 disables clipping
    val_fraction: float = 0.2  # of windows (of a corpus: of its runs) held out to measure error
    log_every: int = 25
    checkpoint_every: int = 100  # steps between checkpoints when streaming from a corpus
    val_windows: int = 256  # held-out windows scored when streaming from a corpus
    seed: int = 0


@dataclass
class TeacherConfig:
    """The Video-LLaMA teacher (DESIGN §2) and its pretraining on captioned web clips.

    Defaults are the embedded CPU world; the paper's sizes are 32 image and 32 video
    queries on EVA ViT-g at 224 px with LLaMA-2-7B (set llm to a local folder).
    """

    preset: str = "embedded"  # embedded | videollama2-7b (fields left at their default take the preset's)
    blip2_checkpoint: str = ""  # HF BLIP-2 folder/.safetensors: EVA ViT-g + image Q-Former (videollama2-7b)
    videollama_checkpoint: str = ""  # Video-LLaMA-2 VL branch .pth/.safetensors (videollama2-7b)
    qformer_hidden: int = 0  # Q-Former width when bert='none' (0: 64; BLIP-2: 768)
    qformer_heads: int = 0  # Q-Former heads when bert='none' (0: 4; BLIP-2: 12)
    llm: str = "smollm2"  # 'smollm2' (embedded) or a local transformers folder
    llm_dtype: str = "auto"  # auto (bf16 on a CUDA GPU, fp32 on every CPU) | bfloat16 | float32
    vision: str = "efficientnet-lite0"
    image_size: int = 128  # backbone input px (224: 7x7 patches; 128: 4x4)
    n_frames: int = 8  # frames sampled per clip
    bert: str = "minilm"  # initialises the Q-Formers; 'none' for random
    image_queries: int = 8  # paper/BLIP-2: 32 (CPU budget: see BENCHMARKS)
    image_layers: int = 2
    video_queries: int = 8  # L, video tokens per clip (paper: 32)
    video_layers: int = 2
    max_frames: int = 32  # frame position embeddings
    cross_attention_frequency: int = 1
    projector: str = "mlp"  # llama_proj: mlp (Linear-GELU-Linear, LLaVA-1.5) | linear (Video-LLaMA)
    projector_hidden: int = 1024  # width of the mlp projector
    token_norm: bool = True  # rescale video tokens to the LLM embedding std
    system_prompt: str = "You describe short videos."  # '' keeps the template default
    # stage 1 (BLIP-2's image-text contrastive, ITC): pooled video-Q-Former output vs a caption's
    # frozen sentence embedding, before the slow captioning stage; 0 skips it (pretrained Q-Former)
    itc_steps: int = 60  # the demo's ITC loss is 0.21 by step 51 (0.07 at 100); see BENCHMARKS
    itc_batch_size: int = 32
    itc_lr: float = 3e-4
    itc_tau: float = 0.07  # BLIP-2's initial ITC temperature
    # stage 2 (captioning through the frozen LLM)
    train_qformers: bool = False  # false: only llama_proj learns here (Q-Formers keep stage 1)
    captions: str = "first"  # first (each clip's first caption, one canonical text) | all (random)
    steps: int = 120
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.01
    heldout_fraction: float = 0.2  # web clips held out to evaluate the teacher
    max_new_tokens: int = 24
    greedy: bool = True  # greedy decoding; else sampling seeded by seed
    generate_batch_size: int = 128  # clips per generation (annotate): 0.92x the time of 64 (BENCHMARKS)
    seed: int = 0


@dataclass
class Stage1Config:
    """Stage I recipe: align the student's Z with the teacher's video tokens X (DESIGN §2)."""

    # with the linear path the validation loss is lowest before any step on the demo data (the
    # deep path's residual only adds held-out noise there, BENCHMARKS); 100 steps are scored
    # and the best kept. Without it (encoder.linear_rank=0) 250 was best (600 overfit)
    steps: int = 100
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 10
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping
    checkpoint_every: int = 50  # steps between checkpoints (and on SIGTERM/SIGINT)
    keep_last: int = 2  # checkpoints kept
    log_every: int = 10  # steps between log.jsonl / TensorBoard writes
    mixed_precision: str = "auto"  # auto (bf16 on a CUDA GPU, fp32 on every CPU) | bf16 | no
    # '' none: at demo scale MBM init made the decoder worse (BENCHMARKS); auto: RUN/mbm/mbm.safetensors
    # or RUN/mbm.safetensors (fmri2text run then runs pretrain-mbm); or a file
    mbm_checkpoint: str = ""
    val_every: int = 25  # steps between validation passes (best step kept); 0 = keep the last
    # validation passes in a row without beating the best before training stops; 0 = never.
    # On all five simulated worlds step 0 stayed best and every later pass (25, 50; 75 and
    # 100 on two of them) was worse: 1 stops at step 25 with the same weights (BENCHMARKS)
    val_patience: int = 1
    # train the linear path's closed-form weights too (AdamW moves each of its 512 x L*d
    # weights by ~lr per step on inputs of scale ~10: it diverged from step 1, BENCHMARKS)
    train_linear: bool = False
    annotations: str = "annotations"  # folder of the teacher's annotations, relative to RUN
    eval_batch_size: int = 32
    seed: int = 0


@dataclass
class Stage2Config:
    """Stage II recipe: answer CE through the frozen LLM + DANCE on held-out adapt fMRI."""

    steps: int = 60
    batch_size: int = 8  # source (fMRI, instruction, answer) triplets per step
    target_batch_size: int = 8  # held-out adapt windows per step (DANCE)
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 5
    grad_clip: float = 1.0
    checkpoint_every: int = 20
    keep_last: int = 2
    log_every: int = 5
    mixed_precision: str = "auto"  # auto follows the LLM dtype (bf16 on a CUDA GPU only) | bf16 | no
    train_tokenizer: bool = False  # DESIGN: only the bridge (adaptors + projector) and g train
    # the linear path's weights learn in Stage II too (false: its closed-form map stays)
    train_linear: bool = False
    # gains of the linear path's predicted deviation tried before training, in increasing
    # order until the validation CE rises; the lowest is kept (models/student.py LinearPath,
    # training/stage2.py choose_gain); [1.0] keeps the ridge map
    linear_gains: list[float] = field(default_factory=lambda: [1.0, 1.25, 1.5, 1.75, 2.0])
    compare_da: bool = False  # also train the other DA setting (same seed) for the with/without table
    # held-out test trials (evenly spaced) for the CE before and after, a diagnostic; 0 = all
    eval_max_trials: int = 32
    val_every: int = 20  # steps between validation CE passes (best step kept); 0 = keep the last
    # passes in a row without beating the best before stopping; 0 = never. Off: it stopped
    # MBM-initialised demo runs on step 0 where step 60 was better (BENCHMARKS, session 16)
    val_patience: int = 0
    seed: int = 0


@dataclass
class PipelineConfig:
    """``fmri2text run`` / ``decode``: where the teacher comes from, and decoding settings."""

    teacher_checkpoint: str = ""  # a trained teacher.safetensors; '' fits one on the web clips
    # answer rows per batched generation (rows share each step's read of the LLM's weights)
    decode_batch_size: int = 512
    decode_max_new_tokens: int = 24  # answer length cap of fMRI2Text (and the controls)
    decode_greedy: bool = True  # greedy decoding; else sampling seeded by evaluation.seed
    # > 1: minimum-Bayes-risk decoding of this many sampled answers per trial (+ the greedy one),
    # as are the controls through the LLM (models/generation.py mbr_choice). 0 or 1: one answer
    decode_samples: int = 32
    decode_temperature: float = 0.7  # sampling temperature (decode_samples > 1 or greedy off)
    decode_top_p: float = 0.9  # nucleus of the sampled answers
    # MBR's unigram F-score weighs recall this many times precision (1: ROUGE-1 F)
    decode_mbr_beta: float = 1.0
    # MBR: weight of each sampled answer's agreement with the sentence embedding the student's
    # semantic head predicts (encoder.semantic_head), cosines as directions from the training
    # answers' mean (api.Decoder.embed_answers); 0: plain consensus (why not: see below)
    decode_rerank: float = 1.0
    # choose the decoding on the training subjects' validation trials (tokens cross-fitted as a
    # held-out subject's): one answer, or MBR with each of decode_choose_betas x _reranks, at
    # each of decode_choose_deep_gains; the best mean of BERTScore-F1 and BLEU-1 against the
    # teacher's answers decodes the test trials, the controls and the exported model
    # (decode.json 'decoding_choice'). Off: decode_samples, _mbr_beta, _rerank, _deep_gain as set
    decode_choose: bool = True
    decode_choose_betas: list[float] = field(default_factory=lambda: [1.0, 1.5, 2.0])
    # no 0 by default: on validation (subjects the deep path trained on) the semantic head looked
    # worth -1.6..+1.2 F1, on held-out test trials +0.7..+10.9 in 15 of 16 (BENCHMARKS, s. 19)
    decode_choose_reranks: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])
    # weight of the deep path's residual in the tokens that decode (0: the linear path alone);
    # [1.0, 0.0] also tries 0: chosen on seed 23 before the alignment (s. 20), never since (s. 23)
    decode_deep_gain: float = 1.0
    decode_choose_deep_gains: list[float] = field(default_factory=lambda: [1.0])
    # teacher health after annotate (fmri2text/health.py): below these the run stops (exit 2)
    min_distinct_answer_fraction: float = 0.05  # distinct answers / clips
    max_token_cosine: float = 0.995  # mean pairwise cosine of the clips' mean video tokens
    min_teacher_gain: float = 5.0  # held-out BERTScore-F1 over the no-video answer (fitted teacher)
    allow_degenerate_teacher: bool = False  # go on anyway (the report and metrics flag it)


@dataclass
class CorpusConfig:
    """``fmri2text corpus build``: MBM windows from many BIDS datasets (data/corpus.py). The
    windows follow the data section (window, high_pass, standardize, smoothing_fwhm)."""

    workers: int = 1  # Dask worker processes of the local cluster (one run each at a time)
    scheduler: str = ""  # a running Dask scheduler's address (tcp://host:8786) instead
    stride: int = 0  # volumes between window starts; 0 = data.window (no overlap)
    row_group: int = 64  # windows per Parquet row group (the unit a reader streams)


@dataclass
class Config:
    """Every setting of a run."""

    seed: int = 0
    simulate: SimulateConfig = field(default_factory=SimulateConfig)
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    mbm: MBMConfig = field(default_factory=MBMConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)


# ----------------------------------------------------------------------------- validation


def valid_keys() -> list[str]:
    """All dotted keys a config accepts, e.g. ``data.window``."""
    return dotted_keys(Config)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file at ``path``, then ``key=value`` overrides."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError("config file not found", path=path, fix="pass an existing YAML file")
        try:
            # safe_load: a YAML tag such as !!python/object is refused, never constructed
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise UserError(f"not valid YAML: {str(err).splitlines()[0]}", path=path,
                            fix="fix the YAML syntax (plain keys and values only)") from None
        except (UnicodeDecodeError, OSError) as err:
            raise UserError(f"cannot read the config file: {err}", path=path,
                            fix="pass a readable UTF-8 YAML text file") from None
        apply(cfg, data, "", str(path), valid_keys)
    override_keys = set()
    for text in overrides or []:
        key, value = parse_override(text, Config, valid_keys)
        apply(cfg, nest(key, value), "", "command line", valid_keys)
        override_keys.add(key)
    # an out-of-range value names where it was set: the command line, else the YAML file
    validate(cfg, source=lambda key: "command line" if key in override_keys or path is None else path)
    return cfg


def validate(cfg: Config, source: Any = None) -> None:
    """Range checks that types alone cannot express.

    ``source(key)``, when given, names where ``key`` was set (a file or 'command line').
    """
    s, p = cfg.simulate, cfg.pipeline
    checks = [
        (s.subjects >= 2, "simulate.subjects", s.subjects, "at least 2 (one to train, one held out)"),
        (s.runs >= 1, "simulate.runs", s.runs, "at least 1"),
        (s.classes >= 2, "simulate.classes", s.classes, "at least 2"),
        (s.resolution > 0, "simulate.resolution", s.resolution, "a positive size in mm"),
        (s.cnr_scale >= 0, "simulate.cnr_scale", s.cnr_scale, "zero or positive"),
        (s.web_clips >= 0, "simulate.web_clips", s.web_clips, "zero or positive"),
        (cfg.data.window >= 1, "data.window", cfg.data.window, "at least 1 volume"),
        (0 <= cfg.encoder.align_shrinkage <= 1, "encoder.align_shrinkage",
         cfg.encoder.align_shrinkage, "in [0, 1] (1: each component's variance alone)"),
        (cfg.data.smoothing_fwhm >= 0, "data.smoothing_fwhm", cfg.data.smoothing_fwhm,
         "zero (none) or a positive FWHM in mm"),
        (cfg.data.space in ("raw", "fmriprep", "cifti"), "data.space", cfg.data.space,
         "one of raw, fmriprep, cifti"),
        (0 < cfg.split.adapt_fraction < 1, "split.adapt_fraction", cfg.split.adapt_fraction,
         "strictly between 0 and 1"),
        (cfg.split.n_heldout >= 1, "split.n_heldout", cfg.split.n_heldout, "at least 1"),
        (cfg.evaluation.n_permutations >= 1, "evaluation.n_permutations",
         cfg.evaluation.n_permutations, "at least 1"),
        (cfg.teacher.projector in ("linear", "mlp"), "teacher.projector", cfg.teacher.projector,
         "one of linear, mlp"),
        (cfg.teacher.captions in ("first", "all"), "teacher.captions", cfg.teacher.captions,
         "one of first, all"),
        (cfg.evaluation.truth_without_captions in ("class", "none"),
         "evaluation.truth_without_captions", cfg.evaluation.truth_without_captions,
         "one of class, none"),
        ("{class_name}" in cfg.evaluation.class_truth_template, "evaluation.class_truth_template",
         cfg.evaluation.class_truth_template, "a text with {class_name} in it, e.g. 'A video of "
         "{class_name}.'"),
        (cfg.teacher.generate_batch_size >= 1, "teacher.generate_batch_size",
         cfg.teacher.generate_batch_size, "at least 1"),
        (p.decode_batch_size >= 1, "pipeline.decode_batch_size", p.decode_batch_size, "at least 1"),
        (cfg.corpus.workers >= 1, "corpus.workers", cfg.corpus.workers, "at least 1"),
        (cfg.corpus.stride >= 0, "corpus.stride", cfg.corpus.stride, "0 (= data.window) or more"),
        (cfg.corpus.row_group >= 1, "corpus.row_group", cfg.corpus.row_group, "at least 1"),
        (p.decode_max_new_tokens >= 1, "pipeline.decode_max_new_tokens", p.decode_max_new_tokens,
         "at least 1"),
        (p.decode_samples >= 0, "pipeline.decode_samples", p.decode_samples,
         "0 or 1 (one answer) or more (MBR decoding)"),
        (p.decode_temperature > 0, "pipeline.decode_temperature", p.decode_temperature,
         "positive, e.g. 0.7"),
        (0 < p.decode_top_p <= 1, "pipeline.decode_top_p", p.decode_top_p, "in (0, 1], e.g. 0.9"),
        (p.decode_mbr_beta > 0, "pipeline.decode_mbr_beta", p.decode_mbr_beta,
         "positive (1: ROUGE-1 F)"),
        (min(p.decode_choose_betas, default=0) > 0,
         "pipeline.decode_choose_betas", p.decode_choose_betas,
         "a non-empty list of positive numbers, e.g. [1.0, 1.5, 2.0]"),
        (p.decode_rerank >= 0, "pipeline.decode_rerank", p.decode_rerank,
         "0 (plain MBR) or positive, e.g. 2.0"),
        (min(p.decode_choose_reranks, default=-1) >= 0,
         "pipeline.decode_choose_reranks", p.decode_choose_reranks,
         "a non-empty list of numbers >= 0, e.g. [0.0, 1.0, 2.0, 4.0]"),
        (p.decode_deep_gain >= 0, "pipeline.decode_deep_gain", p.decode_deep_gain,
         "0 (the linear path alone) or positive (1: the trained student)"),
        (min(p.decode_choose_deep_gains, default=-1) >= 0, "pipeline.decode_choose_deep_gains",
         p.decode_choose_deep_gains, "a non-empty list of numbers >= 0, e.g. [1.0, 0.0]"),
    ]
    for ok, key, value, allowed in checks:
        if not ok:
            raise UserError(f"config value {key}={value!r} is out of range",
                            path=source(key) if source is not None else None,
                            fix=f"{key} must be {allowed}")


def to_dict(cfg: Config) -> dict:
    """The config as plain data (for YAML/JSON)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
