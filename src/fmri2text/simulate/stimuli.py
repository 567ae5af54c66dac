"""Procedural action clips: an actor (shape, colour) performs an action in a scene.

Each clip is a unique rendering (random position, size, speed, phase, background texture),
encoded as a small mp4 with PyAV, described by several natural captions from templates, and
summarised by two feature vectors that drive the simulated brain (see ``brain.py``):

- semantic: one-hot codes of its attributes (shape, colour, action, scene);
- low-level: statistics measured on the rendered frames (luminance, contrast, colour
  opponency, motion energy, spatial-frequency energy, actor position and area).

A class is a (colour, shape, action) combination, named like HAD's folders
("red ball bouncing"); the scene varies from clip to clip.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import av
import numpy as np

SHAPES = ["ball", "square", "triangle", "star", "ring", "diamond"]
COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220),
    "yellow": (240, 220, 40), "purple": (150, 60, 200), "orange": (250, 140, 30),
    "white": (245, 245, 245), "pink": (250, 130, 190),
}
#: action name (class names) -> (gerund phrase, third-person phrase, actor changes place)
ACTIONS = {
    "bouncing": ("bouncing", "bounces up and down", True),
    "spinning": ("spinning", "spins around", False),
    "sliding left": ("sliding to the left", "slides to the left", True),
    "sliding right": ("sliding to the right", "slides to the right", True),
    "growing": ("growing", "grows bigger", False),
    "shrinking": ("shrinking", "shrinks", False),
    "orbiting": ("moving in a circle", "moves in a circle", True),
    "falling": ("falling", "falls down", True),
    "rising": ("rising", "rises up", True),
    "shaking": ("shaking", "shakes from side to side", False),
}
#: scene -> (caption phrase, sky colour, ground colour, horizon as a fraction of height)
SCENES = {
    "grass": ("on the grass", (135, 190, 235), (60, 140, 50), 0.6),
    "sky": ("in the sky", (90, 150, 230), (170, 205, 245), 1.0),
    "desert": ("in the desert", (170, 210, 240), (220, 190, 120), 0.6),
    "night": ("at night", (15, 20, 50), (30, 30, 45), 0.75),
    "snow": ("in the snow", (200, 210, 220), (235, 240, 245), 0.55),
    "sea": ("by the sea", (150, 200, 240), (30, 90, 170), 0.5),
    "room": ("in a room", (200, 180, 150), (110, 75, 50), 0.7),
}
SEMANTIC_NAMES = ([f"shape={s}" for s in SHAPES] + [f"colour={c}" for c in COLOURS]
                  + [f"action={a}" for a in ACTIONS] + [f"scene={s}" for s in SCENES])
LOWLEVEL_NAMES = ["luminance", "contrast", "red_green", "blue_yellow", "motion_energy",
                  "high_spatial_freq", "actor_x", "actor_y", "actor_area"]
ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
_TEMPLATES = [  # caption 0 is always the first (canonical) one
    "{A} {colour} {shape} is {gerund} {scene}.",
    "{Scene}, {a} {colour} {shape} {verb}.",
    "The video shows {a} {colour} {shape} {gerund} {scene}.",
    "There is {a} {colour} {shape} {gerund} {scene}.",
    "{A} {shape} coloured {colour} {verb} {scene}.",
    "We see {a} {colour} {shape} that {verb} {scene}.",
    "{Colour} {shape} {gerund} {scene}.",
    "{A} {colour} {shape} {verb} {scene}.",
]


@dataclass(frozen=True)
class ClipSpec:
    """The latent attributes of one rendered clip (all that is needed to render it again)."""

    clip_id: str  # 11-char source-video id (clips of one source share it)
    start: float  # seconds, distinguishes clips of the same source
    shape: str
    colour: str
    action: str
    scene: str
    x0: float  # actor start position, fraction of the frame width
    y0: float  # ... fraction of the frame height (0 = top)
    size: float  # actor radius, fraction of the frame size
    speed: float  # action rate multiplier
    phase: float  # action phase, radians
    angle0: float  # initial orientation, radians
    texture_seed: int  # background texture of the source video

    def attributes(self) -> dict:
        """The spec as a flat dict (for clips.tsv)."""
        return asdict(self)


def class_name(colour: str, shape: str, action: str) -> str:
    """HAD-like class folder name, e.g. ``"red ball bouncing"``."""
    return f"{colour} {shape} {action}"


def choose_classes(n: int, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """Pick ``n`` distinct (colour, shape, action) classes, balancing every attribute's use.

    Greedy: among a shuffled list of all combinations, repeatedly take the one whose
    attribute values have been used least so far. Returns them in ASCII order of name.
    """
    combos = [(c, s, a) for c in COLOURS for s in SHAPES for a in ACTIONS]
    if n > len(combos):
        raise ValueError(f"at most {len(combos)} classes can be made, asked for {n}")
    order = rng.permutation(len(combos))
    counts: dict[str, int] = {}
    chosen: list[tuple[str, str, str]] = []
    used = np.zeros(len(combos), bool)
    for _ in range(n):
        best, best_score = -1, None
        for i in order:
            if used[i]:
                continue
            c, s, a = combos[i]
            score = (counts.get("a" + a, 0), counts.get("c" + c, 0) + counts.get("s" + s, 0))
            if best_score is None or score < best_score:
                best, best_score = i, score
        used[best] = True
        c, s, a = combos[best]
        for key in ("a" + a, "c" + c, "s" + s):
            counts[key] = counts.get(key, 0) + 1
        chosen.append(combos[best])
    return sorted(chosen, key=lambda t: class_name(*t))


def random_id(rng: np.random.Generator, taken: set[str]) -> str:
    """A new 11-character YouTube-like id not in ``taken`` (which it is added to)."""
    while True:
        new = "".join(ID_CHARS[i] for i in rng.integers(0, len(ID_CHARS), 11))
        if new not in taken:
            taken.add(new)
            return new


def sample_spec(rng: np.random.Generator, clip_id: str, start: float, colour: str, shape: str,
                action: str, scene: str, texture_seed: int) -> ClipSpec:
    """Random placement and dynamics for a clip of the given attributes."""
    x0, y0 = rng.uniform(0.3, 0.7), rng.uniform(0.35, 0.65)
    if action == "sliding left":
        x0 = rng.uniform(0.6, 0.8)
    elif action == "sliding right":
        x0 = rng.uniform(0.2, 0.4)
    elif action == "falling":
        y0 = rng.uniform(0.2, 0.35)
    elif action == "rising":
        y0 = rng.uniform(0.65, 0.8)
    return ClipSpec(clip_id=clip_id, start=start, shape=shape, colour=colour, action=action,
                    scene=scene, x0=round(float(x0), 4), y0=round(float(y0), 4),
                    size=round(float(rng.uniform(0.09, 0.15)), 4),
                    speed=round(float(rng.uniform(0.7, 1.3)), 4),
                    phase=round(float(rng.uniform(0, 2 * np.pi)), 4),
                    angle0=round(float(rng.uniform(0, 2 * np.pi)), 4), texture_seed=texture_seed)


# ----------------------------------------------------------------------------- rendering


def _trajectory(spec: ClipSpec, t: np.ndarray, duration: float):
    """Actor centre (x, y as frame fractions), radius scale and angle at times ``t`` (F,)."""
    u = t / duration  # 0 → 1 over the clip
    w = 2 * np.pi * spec.speed
    x = np.full_like(t, spec.x0)
    y = np.full_like(t, spec.y0)
    scale = np.ones_like(t)
    angle = np.full_like(t, spec.angle0)
    a = spec.action
    if a == "bouncing":
        y = spec.y0 + 0.15 - 0.3 * np.abs(np.sin(0.5 * w * t + spec.phase))
    elif a == "spinning":
        angle = spec.angle0 + 1.5 * w * t
    elif a == "sliding left":
        x = spec.x0 - 0.4 * spec.speed * u
    elif a == "sliding right":
        x = spec.x0 + 0.4 * spec.speed * u
    elif a == "growing":
        scale = 0.6 + 1.0 * u
    elif a == "shrinking":
        scale = 1.6 - 1.0 * u
    elif a == "orbiting":
        x = 0.5 + 0.22 * np.cos(0.5 * w * t + spec.phase)
        y = 0.5 + 0.22 * np.sin(0.5 * w * t + spec.phase)
    elif a == "falling":
        y = spec.y0 + 0.45 * spec.speed * u ** 1.5
    elif a == "rising":
        y = spec.y0 - 0.45 * spec.speed * u
    elif a == "shaking":
        x = spec.x0 + 0.06 * np.sin(4 * w * t + spec.phase)
    return x, y, scale, angle


def _radius_profile(shape: str, theta: np.ndarray) -> np.ndarray:
    """Boundary radius (fraction of the actor radius) in direction ``theta`` (float64)."""
    fl = np.float64
    if shape in ("ball", "ring"):
        return np.ones_like(theta)
    if shape == "star":
        return fl(0.74) + fl(0.26) * np.cos(fl(5) * theta)
    sides, offset = {"triangle": (3, 0.0), "square": (4, np.pi / 4), "diamond": (4, 0.0)}[shape]
    sector = fl(2 * np.pi / sides)
    return fl(np.cos(np.pi / sides)) / np.cos(np.mod(theta - fl(offset), sector) - fl(np.pi / sides))


def _background(spec: ClipSpec, size: int) -> np.ndarray:
    """Scene image (H, W, 3) float in 0..255, textured by the source's seed."""
    _, sky, ground, horizon = SCENES[spec.scene]
    rng = np.random.default_rng(spec.texture_seed)
    rows = np.arange(size)[:, None, None] / size  # (H, 1, 1)
    h = horizon + rng.uniform(-0.05, 0.05)
    img = np.where(rows < h, np.asarray(sky, float), np.asarray(ground, float))
    img = img * (1.0 + 0.15 * (rows - 0.5))  # vertical shading
    img = np.broadcast_to(img, (size, size, 3)).copy()
    img += rng.normal(0, 6, (size, size, 1))  # texture
    if spec.scene == "night":
        stars = rng.random((size, size)) < 0.01
        img[stars] = 230
    return img


def render_clip(spec: ClipSpec, fps: int, seconds: float, size: int):
    """Render a clip.

    Returns
    -------
    frames : uint8 array (F, H, W, 3), F = round(fps * seconds), H = W = size
    alpha : float32 array (F, H, W), the actor's coverage of each pixel
    """
    n = int(round(fps * seconds))
    t = np.arange(n) / fps  # (F,)
    x, y, scale, angle = _trajectory(spec, t, seconds)
    # float64 throughout: numpy's float32 transcendentals take CPU-specific SIMD paths whose
    # last-bit differences flipped rounded pixels between AVX2 and AVX-512 machines
    fl = np.float64
    radius = (spec.size * size * scale).astype(fl)[:, None, None]  # (F, 1, 1) pixels
    pix = np.arange(size, dtype=fl) + fl(0.5)
    dx = pix[None, None, :] - (x * size).astype(fl)[:, None, None]  # (F, 1, W)
    dy = pix[None, :, None] - (y * size).astype(fl)[:, None, None]  # (F, H, 1)
    r = np.hypot(dx, dy)  # (F, H, W)
    theta = np.arctan2(dy, dx) - angle.astype(fl)[:, None, None]
    edge = _radius_profile(spec.shape, theta) * radius
    alpha = np.clip(edge - r + fl(0.5), 0, 1)
    inner = np.clip(edge - r - fl(0.5), 0, 1)  # inside the dark outline
    if spec.shape == "ring":
        hole = r - fl(0.4) * radius
        alpha *= np.clip(hole + fl(0.5), 0, 1)
        inner *= np.clip(hole - fl(0.5), 0, 1)
    # a dark marker that turns with the actor, so spinning is visible on every shape
    mr = (0.7 if spec.shape == "ring" else 0.4) * radius[:, 0, 0]
    mx = (x * size + mr * np.cos(angle)).astype(fl)[:, None, None]
    my = (y * size + mr * np.sin(angle)).astype(fl)[:, None, None]
    md = np.hypot(pix[None, None, :] - mx, pix[None, :, None] - my)
    marker = np.clip(fl(0.18) * radius - md + fl(0.5), 0, 1) * inner
    bg = _background(spec, size).astype(fl)[None]  # (1, H, W, 3)
    colour = np.asarray(COLOURS[spec.colour], fl)
    dark = fl(25.0)
    paint = (inner * (1 - marker))[..., None]  # (F, H, W, 1) coloured part of the actor
    img = bg * (1 - alpha[..., None]) + dark * (alpha[..., None] - paint) + colour * paint
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), alpha.astype(np.float32)


def lowlevel_features(frames: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Nine frame statistics (order: ``LOWLEVEL_NAMES``), from frames (F, H, W, 3)."""
    f = frames.astype(np.float32) / 255.0
    lum = f @ np.array([0.299, 0.587, 0.114], np.float32)  # (F, H, W)
    lap = (4 * lum[:, 1:-1, 1:-1] - lum[:, :-2, 1:-1] - lum[:, 2:, 1:-1]
           - lum[:, 1:-1, :-2] - lum[:, 1:-1, 2:])
    size = frames.shape[1]
    grid = (np.arange(size) + 0.5) / size * 2 - 1  # -1 (left/top) .. 1
    mass = alpha.sum() + 1e-6
    return np.array([
        lum.mean(), lum.std(),
        (f[..., 0] - f[..., 1]).mean(),
        (f[..., 2] - 0.5 * (f[..., 0] + f[..., 1])).mean(),
        np.abs(np.diff(lum, axis=0)).mean() if len(lum) > 1 else 0.0,
        np.abs(lap).mean(),
        (alpha.sum(axis=(0, 1)) * grid).sum() / mass,
        (alpha.sum(axis=(0, 2)) * grid).sum() / mass,
        alpha.mean(),
    ], dtype=np.float64)


def semantic_features(spec: ClipSpec) -> np.ndarray:
    """One-hot attribute code (order: ``SEMANTIC_NAMES``), shape (31,)."""
    vec = np.zeros(len(SEMANTIC_NAMES))
    for name in (f"shape={spec.shape}", f"colour={spec.colour}", f"action={spec.action}",
                 f"scene={spec.scene}"):
        vec[SEMANTIC_NAMES.index(name)] = 1.0
    return vec


def captions(spec: ClipSpec, rng: np.random.Generator, n: int = 3) -> list[str]:
    """``n`` varied natural captions; the first is always the canonical template."""
    gerund, verb, _ = ACTIONS[spec.action]
    scene = SCENES[spec.scene][0]
    art = "an" if spec.colour[0] in "aeiou" else "a"
    shape_art = "an" if spec.shape[0] in "aeiou" else "a"
    picks = [0] + sorted(rng.choice(np.arange(1, len(_TEMPLATES)), size=n - 1, replace=False))
    out = []
    for i in picks:
        tpl = _TEMPLATES[i]
        a = shape_art if tpl.startswith("{A} {shape}") else art
        text = tpl.format(A=a.capitalize(), a=a, colour=spec.colour, Colour=spec.colour.capitalize(),
                          shape=spec.shape, gerund=gerund, verb=verb, scene=scene,
                          Scene=scene[0].upper() + scene[1:])
        out.append(text)
    return out


def moves(spec: ClipSpec) -> bool:
    """Whether the actor changes place (the simulated subjects' button-press task)."""
    return ACTIONS[spec.action][2]


# ----------------------------------------------------------------------------- encoding


def _codec() -> str:
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


CODEC = _codec()


def rgb_to_yuv420p(frame: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB → (3H/2, W) uint8 planar YUV 4:2:0 (BT.601, limited range, chroma
    averaged over 2x2 blocks), the layout ``av.VideoFrame.from_ndarray(..., "yuv420p")`` reads.

    Done here in integer-exact numpy rather than by FFmpeg's swscale, whose SIMD conversion
    made the encoded bytes differ between two encodes of the same frames on AVX-512 CPUs
    (it reads memory it never wrote); H and W must be even.
    """
    h, w, _ = frame.shape
    f = frame.astype(np.int32)
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    # fixed-point BT.601 (coefficients x 2^8, rounded), as in the JPEG/ITU integer forms
    y = ((66 * r + 129 * g + 25 * b + 128) >> 8) + 16
    rs, gs, bs = (c.reshape(h // 2, 2, w // 2, 2).sum(axis=(1, 3)) for c in (r, g, b))  # 4x sums
    u = ((-38 * rs - 74 * gs + 112 * bs + 512) >> 10) + 128
    v = ((112 * rs - 94 * gs - 18 * bs + 512) >> 10) + 128
    out = np.empty((h * 3 // 2, w), np.uint8)
    out[:h] = np.clip(y, 0, 255)
    out[h:h + h // 4] = np.clip(u, 0, 255).reshape(h // 4, w)
    out[h + h // 4:] = np.clip(v, 0, 255).reshape(h // 4, w)
    return out


def encode_mp4(frames: np.ndarray, fps: int) -> bytes:
    """Encode frames (F, H, W, 3) uint8 to mp4 bytes, bit-exactly: one thread, no dates, the
    colour conversion in :func:`rgb_to_yuv420p`, and x264 without its assembly kernels (on
    AVX-512 CPUs both swscale's and x264's SIMD paths made two encodes of the same frames
    differ; the C paths give the same bytes on every CPU, ~1 ms more per 64 px clip)."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4", options={"fflags": "+bitexact"}) as container:
        if CODEC == "libx264":
            stream = container.add_stream("libx264", rate=fps,
                                          options={"crf": "20", "preset": "veryfast", "threads": "1",
                                                   # x264's C code: its SIMD kernels gave
                                                   # run-to-run different bytes on AVX-512
                                                   "x264-params": "asm=0"})
        else:
            stream = container.add_stream("mpeg4", rate=fps, options={"qscale": "3"})
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        for frame in frames:
            yuv = av.VideoFrame.from_ndarray(rgb_to_yuv420p(frame), format="yuv420p")
            for packet in stream.encode(yuv):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()
