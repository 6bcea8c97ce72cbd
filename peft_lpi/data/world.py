"""A procedurally generated image-caption world for offline demonstrations and tests.

Every image is 32x32 RGB: one object (a shape, a digit or a letter) of some size, colour and position, drawn with
PIL and numpy from a seeded ``numpy.random.Generator``. Captions are fixed templates over a small vocabulary
(``WORLD_VOCABULARY``), e.g. ``"a noisy small red circle on the left"``.

The world has two parts:

* a *generic* distribution used to pretrain the small CLIP backbone (``generate_pretraining_pairs``): all objects,
  faint background textures and, for some images, a mild visual nuisance (noise, blur, ...) named in the caption;
* the *continual tasks* (``WORLD_TASKS``): each is one object family under a strong version of one nuisance, so the
  backbone knows every word but its zero-shot retrieval is degraded; deep prompts can adapt to the shift.
  ``build_offline_benchmark`` returns them in the shared continual-retrieval schema.

Nothing is downloaded; generation of the default benchmark plus 30k pretraining pairs takes seconds.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

WORLD_VERSION = "2"  # bump whenever generation changes: cached backbones record it and are retrained on mismatch
IMAGE_SIZE = 32
_SCALE = 2  # objects are drawn at 2x and box-filtered down, for anti-aliasing
_CANVAS = IMAGE_SIZE * _SCALE

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "ring")
DIGITS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
LETTERS: tuple[str, ...] = ("a", "b", "e", "h", "k", "m", "r", "x")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 195, 60),
    "blue": (45, 95, 240),
    "yellow": (240, 225, 40),
    "purple": (155, 55, 210),
    "orange": (250, 140, 25),
    "white": (240, 240, 240),
    "cyan": (40, 215, 225),
}
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: dict[str, tuple[int, int]] = {  # direction of the offset from the centre
    "left": (-1, 0),
    "right": (1, 0),
    "top": (0, -1),
    "bottom": (0, 1),
    "center": (0, 0),
}
_POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
FAMILIES: dict[str, tuple[str, ...]] = {"shapes": SHAPES, "digits": DIGITS, "letters": LETTERS}
# Visual nuisances; the word is also the caption's style word.
STYLES: tuple[str, ...] = ("noisy", "blurry", "tinted", "faded", "pixelated", "dark")

# Per style: (generic mild range, strong task range) of its severity parameter.
_GENERIC_SEVERITY: dict[str, tuple[float, float]] = {
    "noisy": (0.06, 0.12),  # gaussian sigma on [0, 1] pixels
    "blurry": (0.6, 0.9),  # gaussian blur radius in pixels
    "tinted": (0.2, 0.35),  # blend weight towards a tint colour
    "faded": (0.45, 0.6),  # contrast factor
    "pixelated": (16.0, 16.0),  # side of the down-sampled grid
    "dark": (0.45, 0.6),  # brightness factor
}


@dataclass(frozen=True)
class WorldTask:
    """One continual task: an object family under one strong nuisance, with its own caption emphasis.

    ``name`` is meaningful text (the task semantic similarity embeds it). ``severity`` is the range of the style's
    parameter. ``sizes`` / ``positions`` / ``colours`` restrict the attributes that vary inside the task (the
    caption still spells every attribute, so the text stays in the pretraining distribution; what varies is what
    retrieval must weigh).
    """

    name: str
    family: str
    style: str
    severity: tuple[float, float]
    sizes: tuple[str, ...] = SIZES
    positions: tuple[str, ...] = tuple(POSITIONS)
    colours: tuple[str, ...] = tuple(COLOURS)
    emphasis: str = field(default="")


WORLD_TASKS: tuple[WorldTask, ...] = (
    WorldTask("noisy letters", "letters", "noisy", (0.3, 0.36), emphasis="letter, colour, size, position under static"),
    WorldTask(
        "blurry digits", "digits", "blurry", (1.5, 1.9), emphasis="which digit, and its colour, under heavy blur"
    ),
    WorldTask("tinted letters", "letters", "tinted", (0.58, 0.68), emphasis="true object colour under a colour cast"),
    WorldTask("faded shapes", "shapes", "faded", (0.16, 0.24), emphasis="shape and colour at very low contrast"),
    WorldTask("pixelated letters", "letters", "pixelated", (8.0, 8.0), emphasis="letter identity from an 8x8 mosaic"),
    WorldTask("dark digits", "digits", "dark", (0.3, 0.38), emphasis="digit and colour at a third of the brightness"),
)

_NAME_WORDS: tuple[str, ...] = ("shapes", "digits", "letters")  # used only in task names
_TEMPLATE_WORDS: tuple[str, ...] = ("a", "digit", "letter", "on", "at", "in", "the")
WORLD_VOCABULARY: tuple[str, ...] = tuple(
    dict.fromkeys(
        _TEMPLATE_WORDS + SIZES + tuple(COLOURS) + SHAPES + DIGITS + LETTERS + tuple(POSITIONS) + STYLES + _NAME_WORDS
    )
)


@dataclass(frozen=True)
class _Spec:
    """Everything needed to draw and caption one image."""

    family: str
    obj: str
    size: str
    colour: str
    position: str
    style: str | None
    severity: float


# ----------------------------------------------------------------------------------------------- drawing


_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)


@lru_cache(maxsize=512)
def _glyph(char: str, size: int) -> Image.Image:
    """A centred, bold glyph mask at 2x (cached: font rendering dominates generation time otherwise)."""
    side = 2 * size
    canvas = Image.new("L", (side, side), 0)
    font = ImageFont.load_default(size=size)
    ImageDraw.Draw(canvas).text(
        (side / 2, side / 2), char, fill=255, font=font, anchor="mm", stroke_width=_SCALE, stroke_fill=255
    )
    return canvas


def _caption(spec: _Spec) -> str:
    """The one canonical caption of an image."""
    obj = spec.obj if spec.family == "shapes" else f"{spec.family[:-1]} {spec.obj}"
    style = f"{spec.style} " if spec.style else ""
    return f"a {style}{spec.size} {spec.colour} {obj} {_POSITION_PHRASES[spec.position]}"


def _background(rng: np.random.Generator, faint_pattern_p: float) -> np.ndarray:
    """A dark background, optionally with a faint texture (helps pretraining generalise; never captioned)."""
    base = rng.integers(0, 70, size=3).astype(np.float32) / 255.0
    img = np.broadcast_to(base, (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    if rng.random() < faint_pattern_p:
        yy, xx = _YY, _XX
        kind = int(rng.integers(0, 5))
        period = float(rng.integers(3, 8))
        if kind == 0:
            pat = ((xx + yy * rng.integers(0, 2)) // period % 2).astype(np.float32)  # stripes
        elif kind == 1:
            pat = ((xx // period + yy // period) % 2).astype(np.float32)  # checker
        elif kind == 2:
            pat = rng.random((IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)  # static
        elif kind == 3:
            pat = (xx if rng.random() < 0.5 else yy) / (IMAGE_SIZE - 1)  # gradient
        else:
            pat = (((xx % period) < 1.5) & ((yy % period) < 1.5)).astype(np.float32)  # dots
        colour = rng.integers(40, 256, size=3).astype(np.float32) / 255.0
        alpha = float(rng.uniform(0.2, 0.5))
        img = img * (1 - alpha * pat[..., None]) + alpha * pat[..., None] * colour
    return img


def _draw_object(spec: _Spec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Object colour (3,) and its coverage mask (32, 32) in [0, 1], drawn at 2x then box-filtered."""
    extent = (10 if spec.size == "small" else 17) + rng.uniform(-1, 1)  # object side in output pixels
    shift = 8 if spec.size == "small" else 7
    dx, dy = POSITIONS[spec.position]
    cx = (IMAGE_SIZE / 2 + dx * shift + rng.uniform(-1, 1)) * _SCALE
    cy = (IMAGE_SIZE / 2 + dy * shift + rng.uniform(-1, 1)) * _SCALE
    h = extent * _SCALE / 2
    mask = Image.new("L", (_CANVAS, _CANVAS), 0)
    draw = ImageDraw.Draw(mask)
    if spec.family == "shapes":
        box = (cx - h, cy - h, cx + h, cy + h)
        if spec.obj == "circle":
            draw.ellipse(box, fill=255)
        elif spec.obj == "square":
            s = h * 0.88
            draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=255)
        elif spec.obj == "triangle":
            draw.polygon([(cx, cy - h), (cx + h, cy + h * 0.8), (cx - h, cy + h * 0.8)], fill=255)
        elif spec.obj == "diamond":
            draw.polygon([(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)], fill=255)
        elif spec.obj == "cross":
            t = h * 0.35
            draw.rectangle((cx - t, cy - h, cx + t, cy + h), fill=255)
            draw.rectangle((cx - h, cy - t, cx + h, cy + t), fill=255)
        else:  # ring
            draw.ellipse(box, fill=255)
            draw.ellipse((cx - h * 0.55, cy - h * 0.55, cx + h * 0.55, cy + h * 0.55), fill=0)
    else:
        char = str(DIGITS.index(spec.obj)) if spec.family == "digits" else spec.obj.upper()
        glyph = _glyph(char, int(round(extent * _SCALE * 1.35)))
        mask.paste(glyph, (int(round(cx - glyph.width / 2)), int(round(cy - glyph.height / 2))), glyph)
    cover = np.asarray(mask.reduce(_SCALE), dtype=np.float32) / 255.0
    colour = np.clip(np.array(COLOURS[spec.colour], np.float32) + rng.uniform(-20, 20, 3), 0, 255) / 255.0
    return colour, cover


def _apply_style(img: np.ndarray, style: str, severity: float, rng: np.random.Generator) -> np.ndarray:
    """Apply one visual nuisance of the given severity to an image in [0, 1]."""
    if style == "noisy":
        img = img + rng.normal(0.0, severity, img.shape).astype(np.float32)
    elif style == "blurry":
        pil = Image.fromarray(_to_uint8(img)).filter(ImageFilter.GaussianBlur(severity))
        img = np.asarray(pil, dtype=np.float32) / 255.0
    elif style == "tinted":
        tint = rng.integers(0, 256, size=3).astype(np.float32) / 255.0
        img = (1 - severity) * img + severity * tint
    elif style == "faded":
        grey = rng.uniform(0.3, 0.6)
        img = grey + severity * (img - img.mean())
    elif style == "pixelated":
        side = int(severity)
        pil = (
            Image.fromarray(_to_uint8(img))
            .resize((side, side), Image.BOX)
            .resize((IMAGE_SIZE, IMAGE_SIZE), Image.NEAREST)
        )
        img = np.asarray(pil, dtype=np.float32) / 255.0
    elif style == "dark":
        img = img * severity
    else:
        raise ValueError(f"unknown style {style!r}")
    return img


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _render(spec: _Spec, rng: np.random.Generator, faint_pattern_p: float) -> np.ndarray:
    """Draw one image as uint8 (32, 32, 3)."""
    img = _background(rng, faint_pattern_p)
    colour, cover = _draw_object(spec, rng)
    img = img * (1 - cover[..., None]) + cover[..., None] * colour
    if spec.style is not None:
        img = _apply_style(img, spec.style, spec.severity, rng)
    return _to_uint8(img)


# ------------------------------------------------------------------------------------------- sampling


def _sample_generic(rng: np.random.Generator, style_p: float) -> _Spec:
    family = ("shapes", "digits", "letters")[int(rng.integers(0, 3))]
    objs = FAMILIES[family]
    style = STYLES[int(rng.integers(0, len(STYLES)))] if rng.random() < style_p else None
    severity = float(rng.uniform(*_GENERIC_SEVERITY[style])) if style else 0.0
    return _Spec(
        family=family,
        obj=objs[int(rng.integers(0, len(objs)))],
        size=SIZES[int(rng.integers(0, 2))],
        colour=tuple(COLOURS)[int(rng.integers(0, len(COLOURS)))],
        position=tuple(POSITIONS)[int(rng.integers(0, len(POSITIONS)))],
        style=style,
        severity=severity,
    )


def _sample_task(task: WorldTask, rng: np.random.Generator) -> _Spec:
    objs = FAMILIES[task.family]
    return _Spec(
        family=task.family,
        obj=objs[int(rng.integers(0, len(objs)))],
        size=task.sizes[int(rng.integers(0, len(task.sizes)))],
        colour=task.colours[int(rng.integers(0, len(task.colours)))],
        position=task.positions[int(rng.integers(0, len(task.positions)))],
        style=task.style,
        severity=float(rng.uniform(*task.severity)),
    )


def render_generic_arrays(
    seed: int, n: int, *, stream: int = 0, style_p: float = 0.35, faint_pattern_p: float = 0.5
) -> tuple[np.ndarray, list[str]]:
    """Generic pairs as a uint8 array (n, 32, 32, 3) and captions; the fast path used by pretraining.

    ``stream`` selects an independent random stream for the same seed (e.g. 1 for a held-out set).
    """
    rng = np.random.default_rng([seed, 1, stream])
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    captions: list[str] = []
    for i in range(n):
        spec = _sample_generic(rng, style_p)
        images[i] = _render(spec, rng, faint_pattern_p)
        captions.append(_caption(spec))
    return images, captions


def render_task_arrays(
    task: WorldTask | int, seed: int, n: int, *, split: str = "train"
) -> tuple[np.ndarray, list[str]]:
    """Images (n, 32, 32, 3) uint8 and captions of one task; splits use independent streams."""
    index = task if isinstance(task, int) else WORLD_TASKS.index(task)
    spec_task = WORLD_TASKS[index]
    rng = np.random.default_rng([seed, 2, index, {"train": 0, "validation": 1}.get(split, 2)])
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    captions: list[str] = []
    for i in range(n):
        spec = _sample_task(spec_task, rng)
        images[i] = _render(spec, rng, faint_pattern_p=0.0)
        captions.append(_caption(spec))
    return images, captions


def world_caption_words() -> set[str]:
    """Every word any caption of this world can contain (a subset of ``WORLD_VOCABULARY``)."""
    words = set(_TEMPLATE_WORDS) | set(SIZES) | set(COLOURS) | set(SHAPES) | set(DIGITS) | set(LETTERS)
    words |= set(STYLES) | {w for p in _POSITION_PHRASES.values() for w in p.split()}
    return words


# ------------------------------------------------------------------------------------------- datasets


def _png(image: np.ndarray) -> dict[str, bytes | None]:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return {"bytes": buf.getvalue(), "path": None}


def _encode(images: np.ndarray) -> list[dict[str, bytes | None]]:
    return [_png(img) for img in images]


def generate_pretraining_pairs(seed: int, n: int):  # -> datasets.Dataset
    """The generic image-caption pairs (columns ``image``, ``captions``) the backbone is pretrained on."""
    import datasets

    images, captions = render_generic_arrays(seed, n)
    features = datasets.Features({"image": datasets.Image(), "captions": datasets.Sequence(datasets.Value("string"))})
    return datasets.Dataset.from_dict(
        {"image": _encode(images), "captions": [[c] for c in captions]}, features=features
    )


def build_offline_benchmark(
    seed: int = 0,
    train_per_task: int = 2000,
    val_per_task: int = 300,
    tasks: tuple[WorldTask, ...] | None = None,
):  # -> datasets.DatasetDict
    """The continual benchmark in the shared schema: splits train/validation with image, captions, task, image_id.

    ``task`` is a ``ClassLabel`` whose names are the task names in continual order; ``image_id`` is unique over
    both splits.
    """
    import datasets

    chosen = WORLD_TASKS if tasks is None else tasks
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "captions": datasets.Sequence(datasets.Value("string")),
            "task": datasets.ClassLabel(names=[t.name for t in chosen]),
            "image_id": datasets.Value("int64"),
        }
    )
    splits = {}
    next_id = 0
    for split, per_task in (("train", train_per_task), ("validation", val_per_task)):
        columns: dict[str, list] = {"image": [], "captions": [], "task": [], "image_id": []}
        for t, task in enumerate(chosen):
            if task in WORLD_TASKS:
                images, captions = render_task_arrays(WORLD_TASKS.index(task), seed, per_task, split=split)
            else:  # a user-defined task: render it with its own stream
                images, captions = _render_custom(task, seed, per_task, split, t)
            columns["image"] += _encode(images)
            columns["captions"] += [[c] for c in captions]
            columns["task"] += [t] * per_task
            columns["image_id"] += list(range(next_id, next_id + per_task))
            next_id += per_task
        splits[split] = datasets.Dataset.from_dict(columns, features=features)
    return datasets.DatasetDict(splits)


def _render_custom(task: WorldTask, seed: int, n: int, split: str, position: int) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng([seed, 3, position, {"train": 0, "validation": 1}.get(split, 2)])
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    captions: list[str] = []
    for i in range(n):
        spec = _sample_task(task, rng)
        images[i] = _render(spec, rng, faint_pattern_p=0.0)
        captions.append(_caption(spec))
    return images, captions
