"""Scene generator for the embedded world: flat coloured shapes on a neutral background.

Every scene knows exactly what it drew (shape, colour, tight pixel box, pixel mask) and can ask four kinds of
questions about itself with unambiguous answers. Drawing is plain PIL at the requested size, so boxes are exact
for any image size, including non-square ones.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
PLURALS: dict[str, str] = {s: s + ("es" if s.endswith(("s", "x")) else "s") for s in SHAPES}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (35, 170, 55),
    "blue": (40, 80, 225),
    "yellow": (240, 220, 30),
    "purple": (140, 50, 200),
    "orange": (250, 135, 20),
}
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
MAX_COUNT = 5
COUNT_WORDS: tuple[str, ...] = tuple(str(i) for i in range(MAX_COUNT + 1))
QUESTION_KINDS: tuple[str, ...] = ("color", "exists", "where", "count")
ANSWERS: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "exists": ("yes", "no"),
    "where": POSITIONS,
    "count": COUNT_WORDS,
}

# Relative object sizes (fraction of the shorter image side).
NORMAL_SIZE = (0.24, 0.40)
SMALL_SIZE = (0.08, 0.13)
CLUTTER_SIZE = (0.10, 0.17)
# "Where" is only asked when the object's centre is clearly off-centre along one axis.
WHERE_MIN_OFFSET = 0.14
WHERE_MIN_MARGIN = 0.08


@dataclass
class SceneObject:
    """One drawn object: its shape, colour name, RGB actually used and tight box (x0, y0, x1, y1), x1/y1 exclusive."""

    shape: str
    color: str
    rgb: tuple[int, int, int]
    box: tuple[int, int, int, int]

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return ((x0 + x1) / 2.0, (y0 + y1) / 2.0)


@dataclass
class Question:
    """A question about a scene with its one-word answer; ``target`` is the index of the object asked about (or None)."""

    kind: str
    text: str
    answer: str
    shape: str
    color: str | None = None
    target: int | None = None


@dataclass
class Scene:
    """An image, the objects in it (with boxes), a per-pixel object-index map and questions."""

    image: Image.Image
    objects: list[SceneObject]
    labels: Image.Image  # mode "L"; 0 = background, i + 1 = objects[i]
    background: tuple[int, int, int]
    questions: list[Question] = field(default_factory=list)
    seed: int | None = None

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    def count(self, shape: str, color: str | None = None) -> int:
        return sum(1 for o in self.objects if o.shape == shape and (color is None or o.color == color))


# --------------------------------------------------------------------------------------------- drawing


def _shape_polygon(shape: str, x: float, y: float, s: float) -> list[tuple[float, float]] | None:
    """Polygon vertices for a shape in the box [x, x+s) x [y, y+s); None for the circle (drawn as an ellipse)."""
    e = s - 1.0  # PIL includes the end coordinate
    if shape == "square":
        m = 0.06 * s
        return [(x + m, y + m), (x + e - m, y + m), (x + e - m, y + e - m), (x + m, y + e - m)]
    if shape == "triangle":
        return [(x + e / 2.0, y), (x + e, y + e), (x, y + e)]
    if shape == "diamond":
        return [(x + e / 2.0, y), (x + e, y + e / 2.0), (x + e / 2.0, y + e), (x, y + e / 2.0)]
    if shape == "cross":
        a, b = 0.34 * e, 0.66 * e
        return [
            (x + a, y), (x + b, y), (x + b, y + a), (x + e, y + a), (x + e, y + b), (x + b, y + b),
            (x + b, y + e), (x + a, y + e), (x + a, y + b), (x, y + b), (x, y + a), (x + a, y + a),
        ]
    if shape == "circle":
        return None
    raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")


def _draw(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, s: float, fill) -> None:
    poly = _shape_polygon(shape, x, y, s)
    if poly is None:
        draw.ellipse([x, y, x + s - 1.0, y + s - 1.0], fill=fill)
    else:
        draw.polygon(poly, fill=fill)


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    if amount <= 0:
        return rgb
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def _overlaps(box: tuple[float, float, float, float], boxes: Iterable[tuple[float, float, float, float]], gap: float) -> bool:
    x0, y0, x1, y1 = box
    for a0, b0, a1, b1 in boxes:
        if x0 < a1 + gap and a0 < x1 + gap and y0 < b1 + gap and b0 < y1 + gap:
            return True
    return False


def draw_scene(
    specs: Sequence[tuple[str, str, float]],
    size: int | tuple[int, int] = 64,
    rng: random.Random | None = None,
    background: tuple[int, int, int] | None = None,
    color_jitter: int = 18,
    gap: float | None = None,
) -> Scene:
    """Draw objects given as (shape, colour, relative size) at random non-overlapping places.

    Objects that cannot be placed after many tries are shrunk, and finally skipped (so ``len(scene.objects)`` can be
    smaller than ``len(specs)`` in very crowded requests). Boxes are measured from the drawn pixels, so they are tight.
    """
    rng = rng or random.Random()
    w, h = (size, size) if isinstance(size, int) else size
    side = min(w, h)
    if background is None:
        g = rng.randint(15, 235)
        tint = [rng.randint(-8, 8) for _ in range(3)]
        background = tuple(max(0, min(255, g + t)) for t in tint)  # type: ignore[assignment]
    gap = max(1.0, 0.03 * side) if gap is None else gap
    image = Image.new("RGB", (w, h), background)
    labels = Image.new("L", (w, h), 0)
    d_img, d_lab = ImageDraw.Draw(image), ImageDraw.Draw(labels)
    placed: list[tuple[float, float, float, float]] = []
    objects: list[SceneObject] = []
    for shape, color, rel in specs:
        s = max(3.0, rel * side)
        spot = None
        for attempt in range(60):
            if attempt and attempt % 20 == 0:
                s = max(3.0, s * 0.8)
            if s > w or s > h:
                continue
            x, y = rng.uniform(0, w - s), rng.uniform(0, h - s)
            box = (x, y, x + s, y + s)
            if not _overlaps(box, placed, gap):
                spot = (x, y)
                break
        if spot is None:
            continue
        x, y = spot
        rgb = _jitter(COLORS[color], rng, color_jitter)
        index = len(objects) + 1
        _draw(d_img, shape, x, y, s, rgb)
        _draw(d_lab, shape, x, y, s, index)
        placed.append((x, y, x + s, y + s))
        objects.append(SceneObject(shape, color, rgb, (0, 0, 0, 0)))
    # Tight boxes from the label map.
    if objects:
        import numpy as np

        lab = np.asarray(labels)
        for i, obj in enumerate(objects):
            ys, xs = np.nonzero(lab == i + 1)
            obj.box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return Scene(image=image, objects=objects, labels=labels, background=background)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- questions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def position_of(obj: SceneObject, size: tuple[int, int]) -> str | None:
    """left/right/top/bottom by the dominant offset of the object's centre from the image centre, or None if unclear."""
    w, h = size
    cx, cy = obj.center
    dx, dy = cx / w - 0.5, cy / h - 0.5
    if max(abs(dx), abs(dy)) < WHERE_MIN_OFFSET or abs(abs(dx) - abs(dy)) < WHERE_MIN_MARGIN:
        return None
    if abs(dx) > abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def color_question(scene: Scene, index: int) -> Question:
    o = scene.objects[index]
    return Question("color", f"What color is the {o.shape}?", o.color, o.shape, None, index)


def where_question(scene: Scene, index: int) -> Question | None:
    o = scene.objects[index]
    pos = position_of(o, scene.size)
    if pos is None:
        return None
    return Question("where", f"Where is the {o.shape}?", pos, o.shape, None, index)


def exists_question(scene: Scene, shape: str, color: str) -> Question:
    present = [i for i, o in enumerate(scene.objects) if o.shape == shape and o.color == color]
    return Question(
        "exists",
        f"Is there {_article(color)} {color} {shape}?",
        "yes" if present else "no",
        shape,
        color,
        present[0] if present else None,
    )


def count_question(scene: Scene, shape: str) -> Question:
    n = scene.count(shape)
    return Question("count", f"How many {PLURALS[shape]} are there?", str(n), shape)


def ask(scene: Scene, kind: str, rng: random.Random) -> Question | None:
    """One random well-posed question of ``kind`` about ``scene`` (None if the scene admits none)."""
    objs = scene.objects
    if kind in ("color", "where"):
        unique = [i for i, o in enumerate(objs) if scene.count(o.shape) == 1]
        rng.shuffle(unique)
        for i in unique:
            q = color_question(scene, i) if kind == "color" else where_question(scene, i)
            if q is not None:
                return q
        return None
    if kind == "exists":
        if objs and rng.random() < 0.5:
            o = rng.choice(objs)
            return exists_question(scene, o.shape, o.color)
        present = {(o.shape, o.color) for o in objs}
        shapes_here = sorted({o.shape for o in objs})
        colors_here = sorted({o.color for o in objs})
        r = rng.random()
        # Hard negatives: a shape that is here in another colour, or a colour that is here on another shape.
        if r < 0.4 and shapes_here:
            pool = [(s, c) for s in shapes_here for c in COLORS if (s, c) not in present]
        elif r < 0.8 and colors_here:
            pool = [(s, c) for s in SHAPES for c in colors_here if (s, c) not in present]
        else:
            pool = [(s, c) for s in SHAPES for c in COLORS if (s, c) not in present]
        if not pool:
            pool = [(s, c) for s in SHAPES for c in COLORS if (s, c) not in present]
        s, c = rng.choice(pool)
        return exists_question(scene, s, c)
    if kind == "count":
        return count_question(scene, rng.choice(SHAPES))
    raise ValueError(f"unknown question kind {kind!r}; known kinds: {', '.join(QUESTION_KINDS)}")


def all_questions(scene: Scene) -> list[Question]:
    """Every well-posed question about the scene (colour/where for unique shapes, every count, every existence)."""
    qs: list[Question] = []
    for i, o in enumerate(scene.objects):
        if scene.count(o.shape) == 1:
            qs.append(color_question(scene, i))
            w = where_question(scene, i)
            if w is not None:
                qs.append(w)
    for s in SHAPES:
        for c in COLORS:
            qs.append(exists_question(scene, s, c))
        qs.append(count_question(scene, s))
    return qs


# --------------------------------------------------------------------------------------------- scenes


def _sizes(rng: random.Random, n: int, small: bool, clutter: bool) -> list[float]:
    lo, hi = SMALL_SIZE if small else (CLUTTER_SIZE if clutter else NORMAL_SIZE)
    if not small and not clutter and n > 3:
        hi = max(lo + 0.02, hi - 0.035 * (n - 3))  # crowded scenes use smaller objects so they fit
    return [rng.uniform(lo, hi) for _ in range(n)]


def random_scene(
    seed: int | random.Random | None = None,
    size: int | tuple[int, int] = 64,
    n_objects: int | tuple[int, int] = (1, 4),
    clutter: bool = False,
    small: bool = False,
    kinds: Sequence[str] = QUESTION_KINDS,
    questions_per_kind: int = 1,
    count_focus: bool | None = None,
) -> Scene:
    """A random scene with questions.

    ``n_objects``: an exact number or an inclusive range. ``clutter``: 6-10 smaller objects (distractors).
    ``small``: all objects small (about a tenth of the image side). ``count_focus`` (default: random half the
    time) repeats one shape 0-MAX_COUNT times so that counting questions see all answers.
    """
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    if clutter:
        n = rng.randint(6, 10)
    elif isinstance(n_objects, int):
        n = n_objects
    else:
        n = rng.randint(*n_objects)
    if count_focus is None:
        count_focus = rng.random() < 0.5
    shapes_colors: list[tuple[str, str]] = []
    focus = None
    if count_focus:
        focus = rng.choice(SHAPES)
        k = rng.randint(0, min(MAX_COUNT, max(n, 1)))
        shapes_colors += [(focus, rng.choice(list(COLORS))) for _ in range(k)]
        others = [s for s in SHAPES if s != focus]
        shapes_colors += [(rng.choice(others), rng.choice(list(COLORS))) for _ in range(max(0, n - k))]
    else:
        shapes_colors += [(rng.choice(SHAPES), rng.choice(list(COLORS))) for _ in range(n)]
    rng.shuffle(shapes_colors)
    sizes = _sizes(rng, len(shapes_colors), small, clutter)
    if len(shapes_colors) > MAX_COUNT:
        # Keep every count within the vocabulary: drop extra copies of a shape beyond MAX_COUNT.
        kept, per = [], {}
        for sc in shapes_colors:
            per[sc[0]] = per.get(sc[0], 0) + 1
            if per[sc[0]] <= MAX_COUNT:
                kept.append(sc)
        shapes_colors = kept
        sizes = sizes[: len(kept)]
    scene = draw_scene([(s, c, r) for (s, c), r in zip(shapes_colors, sizes)], size=size, rng=rng)
    scene.seed = seed if isinstance(seed, int) else None
    for kind in kinds:
        for _ in range(questions_per_kind):
            if kind == "count" and focus is not None and rng.random() < 0.7:
                q = count_question(scene, focus)
            else:
                q = ask(scene, kind, rng)
            if q is not None:
                scene.questions.append(q)
    return scene


def heldout_scenes(n: int, seed: int = 1234, **kwargs) -> list[Scene]:
    """``n`` scenes from a seed stream that training never uses (training seeds are below 10**9)."""
    return [random_scene(10**9 + seed * 100_003 + i, **kwargs) for i in range(n)]
