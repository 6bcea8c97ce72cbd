"""An offline referring-expression grounding world: scenes of several world objects, expressions, exact boxes.

Scenes are 64x64 RGB images with 2-4 objects drawn from the retrieval world's vocabulary (`peft_lpi.data.world`:
shapes, digits, letters; its colours and sizes; the same glyph renderer), so every word of an expression is a word
the world backbone's vocabulary has. An expression singles out one object:

* ``"the red letter k"`` when no other object shares its colour and identity (distractors are built to share one of
  the two, so both words matter);
* ``"the large red letter k"`` when a *twin* (same colour and identity) of another size is present;
* ``"the red letter k on the left"`` (``on the right``, ``at the top``, ``at the bottom``) when the twin has the
  same size: the target is the twin further in that direction (along the axis where they are further apart).

Boxes are exact: the tight pixel box of the object's drawn coverage (``x0, y0, x1, y1``, pixels, x1/y1 exclusive).

Two distributions, like the retrieval world:

* *generic* scenes (`render_generic_scenes`) for pretraining the grounding backbone: all families mixed, faint
  background textures, and for 35 % of the scenes a mild version of one nuisance;
* the *continual tasks* (`GROUNDING_TASKS`): the retrieval world's six tasks (one object family under a strong
  nuisance: noisy letters, blurry digits, ...) applied to whole scenes, so the backbone knows every word but its
  zero-shot grounding is degraded in a task-specific way. `build_grounding_benchmark` returns them in the shared
  REC schema (`peft_lpi.data.grounding`).

Deterministic by seed; nothing is downloaded.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .world import (
    _GENERIC_SEVERITY,
    COLOURS,
    DIGITS,
    FAMILIES,
    IMAGE_SIZE,
    SIZES,
    STYLES,
    WORLD_TASKS,
    _glyph,
)

GROUNDING_WORLD_VERSION = "1"  # bump whenever generation changes: cached grounding backbones record it
SCENE_SIZE = 64
MAX_OBJECTS = 4
_SCALE = 2  # drawn at 2x and box-filtered, like the retrieval world
_PIXEL_SCALE = SCENE_SIZE // IMAGE_SIZE  # the pixelation grid scales with the image; other severities are in pixels
_DIRECTIONS = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}


@dataclass(frozen=True)
class GroundingTask:
    """One continual grounding task: scenes of one object family under one strong nuisance."""

    name: str
    family: str
    style: str
    severity: tuple[float, float]


GROUNDING_TASKS: tuple[GroundingTask, ...] = tuple(
    GroundingTask(t.name, t.family, t.style, t.severity) for t in WORLD_TASKS
)


@dataclass(frozen=True)
class SceneObject:
    """One drawn object and its exact box (pixels, xyxy, x1/y1 exclusive)."""

    family: str
    obj: str
    colour: str
    size: str
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class Scene:
    """A rendered scene: the uint8 image, its objects and one expression per describable object (None if not)."""

    image: np.ndarray
    objects: tuple[SceneObject, ...]
    expressions: tuple[str | None, ...]


def _noun(family: str, obj: str) -> str:
    return obj if family == "shapes" else f"{family[:-1]} {obj}"


def describe(objects: tuple[SceneObject, ...] | list[SceneObject], index: int) -> str | None:
    """The expression that singles out ``objects[index]``, or None when the scheme cannot (three or more twins)."""
    target = objects[index]
    twins = [
        o
        for i, o in enumerate(objects)
        if i != index and (o.family, o.obj, o.colour) == (target.family, target.obj, target.colour)
    ]
    base = f"{target.colour} {_noun(target.family, target.obj)}"
    if not twins:
        return f"the {base}"
    if len(twins) > 1:
        return None
    twin = twins[0]
    if twin.size != target.size:
        return f"the {target.size} {base}"
    tx, ty = (target.box[0] + target.box[2]) / 2, (target.box[1] + target.box[3]) / 2
    ox, oy = (twin.box[0] + twin.box[2]) / 2, (twin.box[1] + twin.box[3]) / 2
    dx, dy = tx - ox, ty - oy
    if abs(dx) >= abs(dy):
        direction = "right" if dx > 0 else "left"
    else:
        direction = "bottom" if dy > 0 else "top"
    return f"the {base} {_DIRECTIONS[direction]}"


# ----------------------------------------------------------------------------------------------- drawing


def _object_cover(family: str, obj: str, extent: float) -> np.ndarray:
    """Coverage mask in [0, 1] of one object of side `extent` pixels, on its own square patch (output pixels)."""
    side = int(np.ceil(extent)) + 4
    canvas = side * _SCALE
    mask = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(mask)
    c = canvas / 2
    h = extent * _SCALE / 2
    if family == "shapes":
        box = (c - h, c - h, c + h, c + h)
        if obj == "circle":
            draw.ellipse(box, fill=255)
        elif obj == "square":
            s = h * 0.88
            draw.rectangle((c - s, c - s, c + s, c + s), fill=255)
        elif obj == "triangle":
            draw.polygon([(c, c - h), (c + h, c + h * 0.8), (c - h, c + h * 0.8)], fill=255)
        elif obj == "diamond":
            draw.polygon([(c, c - h), (c + h, c), (c, c + h), (c - h, c)], fill=255)
        elif obj == "cross":
            t = h * 0.35
            draw.rectangle((c - t, c - h, c + t, c + h), fill=255)
            draw.rectangle((c - h, c - t, c + h, c + t), fill=255)
        else:  # ring
            draw.ellipse(box, fill=255)
            draw.ellipse((c - h * 0.55, c - h * 0.55, c + h * 0.55, c + h * 0.55), fill=0)
    else:
        char = str(DIGITS.index(obj)) if family == "digits" else obj.upper()
        glyph = _glyph(char, int(round(extent * _SCALE * 1.35)))
        mask.paste(glyph, (int(round(c - glyph.width / 2)), int(round(c - glyph.height / 2))), glyph)
    return np.asarray(mask.reduce(_SCALE), dtype=np.float32) / 255.0


def _background(rng: np.random.Generator, faint_pattern_p: float) -> np.ndarray:
    base = rng.integers(0, 70, size=3).astype(np.float32) / 255.0
    img = np.broadcast_to(base, (SCENE_SIZE, SCENE_SIZE, 3)).copy()
    if rng.random() < faint_pattern_p:
        yy, xx = np.mgrid[0:SCENE_SIZE, 0:SCENE_SIZE].astype(np.float32)
        kind = int(rng.integers(0, 4))
        period = float(rng.integers(3, 9))
        if kind == 0:
            pat = ((xx + yy * rng.integers(0, 2)) // period % 2).astype(np.float32)
        elif kind == 1:
            pat = ((xx // period + yy // period) % 2).astype(np.float32)
        elif kind == 2:
            pat = rng.random((SCENE_SIZE, SCENE_SIZE)).astype(np.float32)
        else:
            pat = (xx if rng.random() < 0.5 else yy) / (SCENE_SIZE - 1)
        colour = rng.integers(40, 256, size=3).astype(np.float32) / 255.0
        alpha = float(rng.uniform(0.2, 0.45))
        img = img * (1 - alpha * pat[..., None]) + alpha * pat[..., None] * colour
    return img


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _apply_style(img: np.ndarray, style: str, severity: float, rng: np.random.Generator) -> np.ndarray:
    """The retrieval world's nuisances on a whole scene (the pixelation grid scales with the scene size)."""
    if style == "noisy":
        return img + rng.normal(0.0, severity, img.shape).astype(np.float32)
    if style == "blurry":
        pil = Image.fromarray(_to_uint8(img)).filter(ImageFilter.GaussianBlur(severity))
        return np.asarray(pil, dtype=np.float32) / 255.0
    if style == "tinted":
        tint = rng.integers(0, 256, size=3).astype(np.float32) / 255.0
        return (1 - severity) * img + severity * tint
    if style == "faded":
        return rng.uniform(0.3, 0.6) + severity * (img - img.mean())
    if style == "pixelated":
        side = int(severity) * _PIXEL_SCALE
        pil = Image.fromarray(_to_uint8(img)).resize((side, side), Image.BOX).resize((SCENE_SIZE,) * 2, Image.NEAREST)
        return np.asarray(pil, dtype=np.float32) / 255.0
    if style == "dark":
        return img * severity
    raise ValueError(f"unknown style {style!r}")


def _place(extents: list[float], rng: np.random.Generator) -> list[tuple[float, float]] | None:
    """Centres for objects of the given sides with non-overlapping boxes (2 px apart), or None after 60 tries."""
    centres: list[tuple[float, float]] = []
    for extent in extents:
        half = extent / 2 + 1
        for _ in range(60):
            cx, cy = rng.uniform(half + 1, SCENE_SIZE - half - 1, size=2)
            if all(
                abs(cx - ox) > half + oe / 2 + 2 or abs(cy - oy) > half + oe / 2 + 2
                for (ox, oy), oe in zip(centres, extents)
            ):
                centres.append((float(cx), float(cy)))
                break
        else:
            return None
    return centres


def _sample_objects(
    rng: np.random.Generator, families: tuple[str, ...], n: int, twin_p: float
) -> list[tuple[str, str, str, str]]:
    """(family, obj, colour, size) of n objects: a target, then distractors sharing its colour or its identity."""
    colours = tuple(COLOURS)
    fam = families[int(rng.integers(0, len(families)))]
    target = (fam, FAMILIES[fam][int(rng.integers(0, len(FAMILIES[fam])))], colours[int(rng.integers(0, 8))])
    specs = [target + (SIZES[int(rng.integers(0, 2))],)]
    twin_used = False
    for _ in range(n - 1):
        u = rng.random()
        if not twin_used and u < twin_p:
            family, obj, colour = target
            twin_used = True
        elif u < 0.4 + twin_p * 0.5:  # same identity, another colour
            family, obj = target[:2]
            colour = colours[int(rng.integers(0, 8))]
        elif u < 0.8:  # same colour, another identity of the target's family
            family, colour = target[0], target[2]
            obj = FAMILIES[family][int(rng.integers(0, len(FAMILIES[family])))]
        else:  # anything
            family = families[int(rng.integers(0, len(families)))]
            obj = FAMILIES[family][int(rng.integers(0, len(FAMILIES[family])))]
            colour = colours[int(rng.integers(0, 8))]
        if (family, obj, colour) == target and any(s[:3] == target for s in specs[1:]):
            colour = colours[(colours.index(colour) + 1 + int(rng.integers(0, 7))) % 8]  # never a third twin
        specs.append((family, obj, colour, SIZES[int(rng.integers(0, 2))]))
    order = rng.permutation(n)  # the target is not always drawn first
    return [specs[i] for i in order]


def render_scene(
    rng: np.random.Generator,
    families: tuple[str, ...],
    *,
    num_objects: tuple[int, int] = (2, MAX_OBJECTS),
    style: str | None = None,
    severity: float = 0.0,
    faint_pattern_p: float = 0.0,
    twin_p: float = 0.25,
) -> Scene:
    """Draw one scene: objects from `families`, optional nuisance `style` at `severity`, exact boxes, expressions."""
    n = int(rng.integers(num_objects[0], num_objects[1] + 1))
    while True:
        specs = _sample_objects(rng, families, n, twin_p)
        extents = [(10.0 if size == "small" else 17.0) + float(rng.uniform(-1, 1)) for *_, size in specs]
        centres = _place(extents, rng)
        if centres is not None:
            break
    img = _background(rng, faint_pattern_p)
    objects: list[SceneObject] = []
    for (family, obj, colour, size), extent, (cx, cy) in zip(specs, extents, centres):
        cover = _object_cover(family, obj, extent)
        side = cover.shape[0]
        x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
        # clip the patch to the scene (placement keeps the object inside; the patch margin may stick out)
        sx0, sy0 = max(0, -x0), max(0, -y0)
        sx1, sy1 = min(side, SCENE_SIZE - x0), min(side, SCENE_SIZE - y0)
        cover = cover[sy0:sy1, sx0:sx1]
        x0, y0 = x0 + sx0, y0 + sy0
        rgb = np.clip(np.array(COLOURS[colour], np.float32) + rng.uniform(-20, 20, 3), 0, 255) / 255.0
        region = img[y0 : y0 + cover.shape[0], x0 : x0 + cover.shape[1]]
        region[:] = region * (1 - cover[..., None]) + cover[..., None] * rgb
        ys, xs = np.nonzero(cover > 0.25)
        box = (float(x0 + xs.min()), float(y0 + ys.min()), float(x0 + xs.max() + 1), float(y0 + ys.max() + 1))
        objects.append(SceneObject(family, obj, colour, size, box))
    if style is not None:
        img = _apply_style(img, style, severity, rng)
    expressions = tuple(describe(objects, i) for i in range(len(objects)))
    return Scene(_to_uint8(img), tuple(objects), expressions)


# ------------------------------------------------------------------------------------------- generation


def render_generic_scenes(
    seed: int, n: int, *, stream: int = 0, style_p: float = 0.35, faint_pattern_p: float = 0.5
) -> list[Scene]:
    """Generic pretraining scenes: every family, faint backgrounds, a mild nuisance on `style_p` of the scenes.

    The nuisance word is NOT in the expressions (an expression names an object, not the image's style).
    """
    rng = np.random.default_rng([seed, 11, stream])
    scenes = []
    families = tuple(FAMILIES)
    for _ in range(n):
        style = STYLES[int(rng.integers(0, len(STYLES)))] if rng.random() < style_p else None
        severity = float(rng.uniform(*_GENERIC_SEVERITY[style])) if style else 0.0
        scenes.append(render_scene(rng, families, style=style, severity=severity, faint_pattern_p=faint_pattern_p))
    return scenes


def render_task_scenes(task: GroundingTask | int, seed: int, n: int, *, split: str = "train") -> list[Scene]:
    """Scenes of one continual task (its family, its strong nuisance); splits use independent streams."""
    index = task if isinstance(task, int) else GROUNDING_TASKS.index(task)
    spec = GROUNDING_TASKS[index] if isinstance(task, int) else task
    rng = np.random.default_rng([seed, 12, index, {"train": 0, "validation": 1}.get(split, 2)])
    return [
        render_scene(rng, (spec.family,), style=spec.style, severity=float(rng.uniform(*spec.severity)))
        for _ in range(n)
    ]


def scene_targets(scene: Scene, rng: np.random.Generator) -> tuple[str, tuple[float, float, float, float]]:
    """One (expression, box) of a scene, chosen at random among its describable objects."""
    choices = [i for i, e in enumerate(scene.expressions) if e is not None]
    i = choices[int(rng.integers(0, len(choices)))]
    return scene.expressions[i], scene.objects[i].box  # type: ignore[return-value]


def _png(image: np.ndarray) -> dict[str, bytes | None]:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return {"bytes": buf.getvalue(), "path": None}


def build_grounding_benchmark(
    seed: int = 0,
    train_per_task: int = 1000,
    val_per_task: int = 250,
    tasks: tuple[GroundingTask, ...] | None = None,
    *,
    train_all_objects: bool = False,
):  # -> datasets.DatasetDict
    """The continual grounding benchmark in the shared REC schema: splits train / validation.

    One row per scene: one of its objects (chosen at random) with its expression and box; ``image_id`` is unique
    per scene over both splits; ``task`` is a ClassLabel with the task names in order. `train_all_objects`: the
    train split has one row per describable object of each scene instead (the rows of a scene share its
    ``image_id``, as RefCOCO's expressions of one photo do); the validation split is the same either way.
    """
    import datasets

    from .grounding import grounding_features

    chosen = GROUNDING_TASKS if tasks is None else tasks
    features = grounding_features([t.name for t in chosen])
    splits = {}
    next_id = 0
    for split, per_task in (("train", train_per_task), ("validation", val_per_task)):
        columns: dict[str, list] = {"image": [], "expression": [], "box": [], "task": [], "image_id": []}
        for t, task in enumerate(chosen):
            scenes = render_task_scenes(task, seed, per_task, split=split)
            pick = np.random.default_rng([seed, 13, t, {"train": 0, "validation": 1}.get(split, 2)])
            for scene in scenes:
                if train_all_objects and split == "train":
                    pairs = [(e, o.box) for e, o in zip(scene.expressions, scene.objects) if e is not None]
                else:
                    pairs = [scene_targets(scene, pick)]
                image = _png(scene.image)
                for expression, box in pairs:
                    columns["image"].append(image)
                    columns["expression"].append(expression)
                    columns["box"].append(list(box))
                    columns["task"].append(t)
                    columns["image_id"].append(next_id)
                next_id += 1
        splits[split] = datasets.Dataset.from_dict(columns, features=features)
    return datasets.DatasetDict(splits)


def grounding_words() -> set[str]:
    """Every word an expression of this world can contain."""
    words = {"the", "digit", "letter", "on", "at"} | set(SIZES) | set(COLOURS)
    words |= {w for fam in FAMILIES.values() for w in fam}
    words |= {w for phrase in _DIRECTIONS.values() for w in phrase.split()}
    return words
