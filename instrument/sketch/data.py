"""Procedural videos with captions: the sketch model's training data, made on the fly.

Each clip is a few shapes (circle, square, triangle, star, ring, cross, heart) of named colours, moving,
bouncing, rotating, growing or shrinking over a plain, striped, checkered, gradient or noisy background,
with a caption from a small fixed grammar:

    "a red circle moving left over a blue striped background"
    "two yellow stars bouncing and a white heart rotating on a black plain background"

A clip is a `ClipSpec` (everything drawn from a seed, so the same seed gives the same clip) rendered by
`render` at any frame times: motion is a closed-form function of time, and every motion stays on screen
for ever (moving objects wrap around, bouncing ones reflect, growing ones start over), so a stream can be
sampled anywhere along its time axis. Shapes are signed distance functions with one pixel of antialiasing,
rendered with torch, batched, on any device.

Backgrounds use only shades of their own colour, between BG_SHADE and 1 times it, and objects use the exact
palette colours; `colour_counts` / `dominant_colour` rely on that to tell objects from background (see
`dominant_colour`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

FPS = 16
SIZE = 128

COLOURS = {  # name -> sRGB 0..255
    "red": (220, 40, 40), "orange": (255, 140, 0), "yellow": (245, 220, 40), "green": (40, 180, 60),
    "blue": (40, 80, 220), "purple": (140, 60, 200), "pink": (255, 130, 190), "white": (245, 245, 245),
    "black": (15, 15, 15), "grey": (128, 128, 128), "brown": (130, 80, 40), "cyan": (40, 210, 220),
}
SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "heart")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
           "ring": "rings", "cross": "crosses", "heart": "hearts"}
MOTIONS = ("moving left", "moving right", "moving up", "moving down", "bouncing", "rotating", "growing",
           "shrinking")
BACKGROUNDS = ("plain", "striped", "checkered", "gradient", "noisy")
COUNTS = {1: "a", 2: "two", 3: "three"}
SYMMETRIC = ("circle", "ring")  # rotating them shows nothing, so they never get "rotating"
BG_SHADE = 0.78  # backgrounds span BG_SHADE..1 times their colour
GROW_PERIOD = 4.0  # seconds for a growing / shrinking object to go through its sizes once

_COLOUR_NAMES = tuple(COLOURS)
_PALETTE = torch.tensor([COLOURS[c] for c in _COLOUR_NAMES], dtype=torch.float32) / 255.0
_RGB = dict(zip(_COLOUR_NAMES, _PALETTE.tolist()))  # the same float32 values, read without a tensor op each


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class Group:
    """`count` objects that share colour, shape and kind of motion."""

    count: int
    colour: str
    shape: str
    motion: str

    @property
    def words(self) -> str:
        noun = self.shape if self.count == 1 else PLURALS[self.shape]
        return f"{_article(self.colour) if self.count == 1 else COUNTS[self.count]} {self.colour} {noun} {self.motion}"


@dataclass(frozen=True)
class Description:
    """What a caption says: one or two groups of objects over a background."""

    groups: tuple[Group, ...]
    background_colour: str
    background: str
    preposition: str = "over"

    @property
    def caption(self) -> str:
        objects = " and ".join(g.words for g in self.groups)
        bg = self.background_colour
        return f"{objects} {self.preposition} {_article(bg)} {bg} {self.background} background"

    @property
    def colours(self) -> tuple[str, ...]:
        return tuple(g.colour for g in self.groups)


@dataclass(frozen=True)
class Instance:
    """One drawn object: where it starts and how it moves, in frame units (the frame is 1 x 1)."""

    shape: str
    colour: str
    motion: str
    x: float
    y: float
    radius: float
    angle: float
    vx: float
    vy: float
    spin: float
    phase: float


@dataclass(frozen=True)
class ClipSpec:
    seed: int
    description: Description
    instances: tuple[Instance, ...]
    background_params: tuple[float, ...]  # angle, period, and the noise grid's seed

    @property
    def caption(self) -> str:
        return self.description.caption


def vocabulary() -> list[str]:
    """Every word a caption can contain, in a fixed order (the tokenizer's vocabulary)."""
    words = ["a", "an", "and", "over", "on", "background", "two", "three", *COLOURS, *SHAPES, *PLURALS.values(),
             *BACKGROUNDS]
    for m in MOTIONS:
        words.extend(m.split())
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(w, None)
    return list(seen)


MAX_OBJECT_SCALE = 3.0  # a bouncing object's radius must stay under half the frame


def sample(seed: int, object_scale: float = 1.0, upright: bool = False) -> ClipSpec:
    """The clip of a seed: caption and every object's parameters, from numpy's PCG64 (platform independent).
    `object_scale` multiplies every object's radius (a model's `object_scale`); `upright` starts every object
    at angle 0 instead of a random one (a model's `upright`); the caption and everything else about the
    seed's clip stay the same."""
    if not 0.0 < object_scale <= MAX_OBJECT_SCALE:
        raise ValueError(f"object scale {object_scale}: expected more than 0 and at most {MAX_OBJECT_SCALE}")
    rng = np.random.default_rng(seed)
    two_groups = rng.random() < 0.3
    first = int(rng.choice([1, 2], p=[0.7, 0.3])) if two_groups else int(rng.choice([1, 2, 3], p=[0.6, 0.25, 0.15]))
    counts = [first, 1] if two_groups else [first]
    colours = [str(c) for c in rng.choice(_COLOUR_NAMES, size=len(counts) + 1, replace=False)]
    bg_colour = colours.pop()
    groups = []
    for count, colour in zip(counts, colours):
        shape = str(rng.choice(SHAPES))
        motions = [m for m in MOTIONS if not (m == "rotating" and shape in SYMMETRIC)]
        groups.append(Group(count, colour, shape, str(rng.choice(motions))))
    description = Description(tuple(groups), bg_colour, str(rng.choice(BACKGROUNDS)),
                              str(rng.choice(["over", "on"])))
    total = sum(counts)
    instances = []
    for g in groups:
        direction = {"moving left": (-1, 0), "moving right": (1, 0), "moving up": (0, -1),
                     "moving down": (0, 1)}.get(g.motion)
        for _ in range(g.count):
            radius = object_scale * float(rng.uniform(0.09, 0.16) if total == 1 else rng.uniform(0.07, 0.12))
            speed = float(rng.uniform(0.15, 0.35))
            if direction is not None:
                vx, vy = direction[0] * speed, direction[1] * speed
            elif g.motion == "bouncing":
                a = rng.uniform(0, 2 * math.pi)
                vx, vy = speed * 1.3 * math.cos(a), speed * 1.3 * math.sin(a)
            else:
                vx = vy = 0.0
            spin = _drawn_spin(rng) if g.motion == "rotating" else 0.0
            x, y, angle = float(rng.uniform(0.2, 0.8)), float(rng.uniform(0.2, 0.8)), float(rng.uniform(0, 2 * math.pi))
            instances.append(Instance(g.shape, g.colour, g.motion, x, y, radius, 0.0 if upright else angle,
                                      vx, vy, spin, float(rng.uniform(0, 1))))
    bg = (float(rng.choice([0.0, 0.25, 0.5, 0.75]) * math.pi), float(rng.uniform(0.08, 0.2)),
          float(rng.integers(0, 2**31 - 1)))
    return ClipSpec(seed, description, tuple(instances), bg)


def _drawn_spin(rng: np.random.Generator) -> float:
    """A rotating object's turn rate in radians per second, either way round."""
    return float(rng.choice([-1, 1]) * rng.uniform(1.0, 2.5))


def reshaped(spec: ClipSpec, rng: np.random.Generator) -> ClipSpec:
    """The same clip with its first group's objects drawn as another shape, one their motion allows (a rotating
    group never becomes circles or rings), and the caption saying so; everything else (positions, sizes,
    angles, colours, motions, background) unchanged. The training's twin pairs: the shape word is all that
    tells the two clips apart."""
    group = spec.description.groups[0]
    shape = str(rng.choice([s for s in SHAPES
                            if s != group.shape and not (group.motion == "rotating" and s in SYMMETRIC)]))
    return _first_group_redrawn(spec, replace(group, shape=shape), lambda inst: replace(inst, shape=shape))


def _first_group_redrawn(spec: ClipSpec, group: Group, redraw) -> ClipSpec:
    """The spec with its first group (caption) replaced by `group` and each of that group's objects by
    redraw(object), in order; the other groups and the background as they were."""
    first = spec.description.groups[0]
    instances = tuple(redraw(inst) if j < first.count else inst  # the first group's objects come first
                      for j, inst in enumerate(spec.instances))
    description = replace(spec.description, groups=(group, *spec.description.groups[1:]))
    return replace(spec, description=description, instances=instances)


def spun(spec: ClipSpec, rng: np.random.Generator) -> ClipSpec:
    """The same clip with its first group rotating in place (each object at a spin `_drawn_spin` draws), and the
    caption saying so; everything else (shapes, positions, sizes, angles, colours, the other groups,
    background) unchanged. A group that rotates already, or of a shape that rotation leaves as it is (circles,
    rings), is returned as it is."""
    group = spec.description.groups[0]
    if group.motion == "rotating" or group.shape in SYMMETRIC:
        return spec
    return _first_group_redrawn(spec, replace(group, motion="rotating"), lambda inst: replace(
        inst, motion="rotating", vx=0.0, vy=0.0, spin=_drawn_spin(rng)))


def one_way(spec: ClipSpec) -> ClipSpec:
    """The same clip with every rotating object turning clockwise on screen (its spin made positive, the
    speed kept). "rotating" then names one motion: a model that cannot tell from the words which way an
    object turns predicts the mean of both ways, and that mean is a disc (README: "Which way it turns")."""
    return replace(spec, instances=tuple(replace(inst, spin=abs(inst.spin)) for inst in spec.instances))


def steady(spec: ClipSpec, speed: float) -> ClipSpec:
    """The same clip with every rotating object turning at `speed` radians a second, each its own way round:
    at a drawn speed, a later chunk must read the turn rate off the chunks before it to carry a turning
    outline on (train --spin-speed; README: "Fourteenth run")."""
    return replace(spec, instances=tuple(replace(inst, spin=math.copysign(speed, inst.spin)) if inst.spin else inst
                                         for inst in spec.instances))


def step_specs(base: int, count: int, object_scale: float, upright: bool, pairs: int, twin_key: list,
               rotating: float = 0.0, one_way_spin: bool = False, spin_speed: float = 0.0) -> list:
    """A training step's clips: the specs of seeds base .. base + count - 1, each with probability `rotating`
    made to rotate (`spun`), then the first `pairs` odd ones redrawn as their even neighbour in another shape
    (`reshaped`; both from rngs of `twin_key`), with `one_way_spin` every rotating object turned clockwise
    (`one_way`), and with a `spin_speed` every one turned at that speed (`steady`). A pure function of its
    arguments, so a worker process may draw a step's specs ahead of it (train.SpecPrefetch)."""
    specs = [sample(base + j, object_scale, upright) for j in range(count)]
    if rotating:
        spins = np.random.default_rng([*twin_key, 1])  # a stream of its own: the twins' draws stay as they were
        specs = [spun(s, spins) if spins.random() < rotating else s for s in specs]
    shapes = np.random.default_rng(twin_key)
    for k in range(pairs):
        specs[2 * k + 1] = reshaped(specs[2 * k], shapes)
    if one_way_spin:
        specs = [one_way(s) for s in specs]
    return [steady(s, spin_speed) for s in specs] if spin_speed else specs


# -- captions back to attributes ------------------------------------------------------------------------
_NOUNS = {**{s: (s, 1) for s in SHAPES}, **{p: (s, 2) for s, p in PLURALS.items()}}
_GROUP = re.compile(r"(an?|two|three) (\w+) (\w+) (moving left|moving right|moving up|moving down|bouncing|"
                    r"rotating|growing|shrinking)$")
_CAPTION = re.compile(r"(.+) (over|on) an? (\w+) (\w+) background$")


def describe(caption: str) -> Description:
    """The attributes a caption states. Raises ValueError for anything outside the caption grammar."""
    text = " ".join(caption.lower().split())
    m = _CAPTION.match(text)
    if not m or m.group(3) not in COLOURS or m.group(4) not in BACKGROUNDS:
        raise ValueError(f"not a sketch caption: {caption!r}")
    groups = []
    for part in m.group(1).split(" and "):
        g = _GROUP.match(part)
        if not g or g.group(2) not in COLOURS or g.group(3) not in _NOUNS:
            raise ValueError(f"not a sketch caption: {caption!r} (cannot read {part!r})")
        count = {"a": 1, "an": 1, "two": 2, "three": 3}[g.group(1)]
        shape, number = _NOUNS[g.group(3)]
        if (count == 1) != (number == 1):
            raise ValueError(f"not a sketch caption: {caption!r} ({g.group(1)} {g.group(3)})")
        groups.append(Group(count, g.group(2), shape, g.group(4)))
    return Description(tuple(groups), m.group(3), m.group(4), m.group(2))


# -- rendering ------------------------------------------------------------------------------------------
def _box(px, py, bx, by):
    qx, qy = px.abs() - bx, py.abs() - by
    return torch.hypot(qx.clamp(min=0), qy.clamp(min=0)) + torch.maximum(qx, qy).clamp(max=0)


def _triangle(px, py, r=0.9):
    k = math.sqrt(3.0)
    px = px.abs() - r
    py = py + r / k
    flip = px + k * py > 0
    px, py = torch.where(flip, (px - k * py) / 2, px), torch.where(flip, (-k * px - py) / 2, py)
    px = px - px.clamp(-2 * r, 0)
    return -torch.hypot(px, py) * torch.sign(py)


def _star(px, py, r=1.05, rf=0.45):
    k1x, k1y = 0.809016994375, -0.587785252292
    px = px.abs()
    d = (k1x * px + k1y * py).clamp(min=0) * 2
    px, py = px - d * k1x, py - d * k1y
    d = (-k1x * px + k1y * py).clamp(min=0) * 2
    px, py = px + d * k1x, py - d * k1y
    px = px.abs()
    py = py - r
    bax, bay = rf * -k1y, rf * k1x - 1.0
    h = ((px * bax + py * bay) / (bax * bax + bay * bay)).clamp(0, r)
    return torch.hypot(px - bax * h, py - bay * h) * torch.sign(py * bax - px * bay)


def _heart(px, py):
    s = 0.62  # the unit heart spans y 0..1.1; scale and centre it on the object's radius
    px, py = px.abs() * s, py * s + 0.5
    upper = torch.sqrt((px - 0.25) ** 2 + (py - 0.75) ** 2) - math.sqrt(2.0) / 4
    m = 0.5 * (px + py).clamp(min=0)
    lower = torch.sqrt(torch.minimum(px ** 2 + (py - 1.0) ** 2, (px - m) ** 2 + (py - m) ** 2)) * torch.sign(px - py)
    return torch.where(py + px > 1.0, upper, lower) / s


def shape_sdf(shape: str, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside) in units of the object's radius; py points up."""
    if shape == "circle":
        return torch.hypot(px, py) - 1.0
    if shape == "square":
        return _box(px, py, 0.8, 0.8)
    if shape == "ring":
        return (torch.hypot(px, py) - 0.72).abs() - 0.28
    if shape == "cross":
        return torch.minimum(_box(px, py, 1.0, 0.3), _box(px, py, 0.3, 1.0))
    if shape == "triangle":
        return _triangle(px, py)
    if shape == "star":
        return _star(px, py)
    if shape == "heart":
        return _heart(px, py)
    raise ValueError(f"unknown shape {shape!r}")


def upload(tensor: torch.Tensor, device) -> torch.Tensor:
    """A tensor on the device; from the host without waiting: a plain copy from pageable memory makes the host
    wait for all the GPU work queued before it, which would starve the GPU between training steps."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)  # already there ("cuda" names the tensor's "cuda:0" too), or no GPU to wait for


def _backgrounds(specs: list[ClipSpec], size: int, device) -> torch.Tensor:
    """[B, 3, size, size] in 0..1: shades of each clip's background colour only. Each kind of background is
    drawn once for all its clips, so the kernels launched do not grow with the batch: the clips go in order of
    kind (each kind a slice of every per-clip tensor), and back in their own order at the end."""
    clips = len(specs)
    if not clips:
        return torch.empty(0, 3, size, size, device=device)
    kinds = [BACKGROUNDS.index(s.description.background) for s in specs]
    order = sorted(range(clips), key=kinds.__getitem__)
    table = []
    for b in order:
        angle, period, _ = specs[b].background_params
        colour = _RGB[specs[b].description.background_colour]
        sharp = period * size / (2 * math.pi)  # antialias the pattern edges over about one pixel
        table.append([*colour, math.cos(angle), math.sin(angle), period, sharp])
    noisy = BACKGROUNDS.index("noisy")
    grids = [torch.rand(1, 1, 7, 7, generator=torch.Generator().manual_seed(int(specs[b].background_params[2])))
             for b in order if kinds[b] == noisy]  # on the CPU, each from its clip's seed: the same on every device
    params = upload(torch.cat([torch.tensor(table, dtype=torch.float32).view(-1), *(g.view(-1) for g in grids)]),
                    device)  # every clip's numbers in one copy
    table, grids = params[:7 * clips].view(clips, 7, 1, 1), params[7 * clips:].view(-1, 1, 7, 7)
    colour, cos, sin, period, sharp = table[:, :3], table[:, 3:4], table[:, 4:5], table[:, 5:6], table[:, 6:7]
    coords = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    u = x * cos + y * sin  # [B, 1, size, size]
    out = torch.empty(clips, 3, size, size, device=device)
    start = 0
    for kind, name in enumerate(BACKGROUNDS):
        s, start = slice(start, start + kinds.count(kind)), start + kinds.count(kind)
        if s.start == s.stop:
            continue
        if name == "plain":
            v = torch.ones_like(x)
        elif name == "striped":
            v = (torch.sin(2 * math.pi * u[s] / period[s]) * sharp[s] + 0.5).clamp(0, 1)
        elif name == "checkered":
            w = -x * sin[s] + y * cos[s]
            v = (torch.sin(2 * math.pi * u[s] / period[s]) * torch.sin(2 * math.pi * w / period[s]) * sharp[s]
                 + 0.5).clamp(0, 1)
        elif name == "gradient":  # each clip's own extremes
            lo, hi = u[s].amin((2, 3), keepdim=True), u[s].amax((2, 3), keepdim=True)
            v = (u[s] - lo) / (hi - lo)
        else:  # noisy: smooth value noise
            v = F.interpolate(grids, size=(size, size), mode="bicubic", align_corners=True).clamp(0, 1)
        torch.mul(colour[s], BG_SHADE + (1 - BG_SHADE) * v, out=out[s])
    return out.index_select(0, upload(torch.tensor(order).argsort(), device))


_PIXELS = {"cpu": 2**19, None: 2**27}  # clips (or objects) x frames x size x size drawn at once, by device type
# On a GPU batching saves kernel launches, and this only bounds the memory (a distance function holds several
# tensors this large at once, the painting two as large as the video). A CPU has no launches to save, and
# there pieces that stay in its caches are the fastest.


def _pieces(start: int, stop: int, steps: int, size: int, device: torch.device) -> list[tuple[int, int]]:
    """(start, stop) of the runs of clips, or objects, from start to stop that are drawn together."""
    per = max(1, _PIXELS.get(device.type, _PIXELS[None]) // max(1, steps * size * size))
    return [(i, min(i + per, stop)) for i in range(start, stop, per)]


class _Objects:
    """Every object of a batch of clips, posed at its clip's times (moving ones wrap around just off screen,
    bouncing ones reflect off the walls, growing and shrinking ones cycle through their sizes every
    GROW_PERIOD), and how much of each pixel a shape covers there, in kernels that do not grow with the batch.
    The objects are grouped by shape (each shape a slice, clips and their objects in order within it) so that
    one distance function serves each slice; `rows[k]` picks each clip's k-th object (`count` where a clip has
    fewer: a row of no cover)."""

    def __init__(self, specs: list[ClipSpec], times: torch.Tensor, size: int):
        device, steps = times.device, times.shape[1]
        objects = sorted(((SHAPES.index(inst.shape), b, k, inst) for b, spec in enumerate(specs)
                          for k, inst in enumerate(spec.instances)), key=lambda o: o[0])
        self.count, self.size, self.steps = len(objects), size, steps
        self.depth = max((len(s.instances) for s in specs), default=0)
        shapes = [o[0] for o in objects]
        self.spans = [(shape, shapes.index(s), shapes.index(s) + shapes.count(s)) for s, shape in enumerate(SHAPES)
                      if s in shapes]
        if not self.count:
            return
        table = []
        rows = [[self.count] * len(specs) for _ in range(self.depth)]
        colours = [[[0.0] * 3] * len(specs) for _ in range(self.depth)]  # no colour where no object
        for i, (_, b, k, inst) in enumerate(objects):
            # The constants are worked out in float64 before becoming float32, as the loop that drew one object at
            # a time did, so that the clips stay the same to the bit (tests/test_sketch_render.py keeps that loop)
            grow, scale = {"growing": (0.55, 0.9), "shrinking": (1.45, -0.9)}.get(inst.motion, (1.0, 0.0))
            if inst.motion == "bouncing":  # lo + a triangle wave of (start + v t) of amplitude span
                span = 1.0 - 2 * inst.radius
                lo, x, y, margin, period = inst.radius, inst.x - inst.radius, inst.y - inst.radius, 0.0, 2 * span
            else:  # -margin + remainder(x + v t + margin, 1 + 2 margin): wrapped around just off screen
                margin = 1.2 * inst.radius
                span, lo, x, y, period = 0.0, -margin, inst.x, inst.y, 1 + 2 * margin
            table.append([inst.radius, grow, scale, inst.phase, inst.angle, inst.spin, inst.vx, inst.vy, x, y, margin,
                          period, span, lo, float(inst.motion == "bouncing")])
            rows[k][b] = i
            colours[k][b] = _RGB[inst.colour]
        floats = upload(torch.cat([torch.tensor(table, dtype=torch.float32).view(-1),
                                   torch.tensor(colours, dtype=torch.float32).view(-1)]), device)
        longs = upload(torch.tensor([o[1] for o in objects] + [i for row in rows for i in row]), device)
        n = self.count
        table = floats[:15 * n].view(n, 15, 1)
        self.colours = floats[15 * n:].view(self.depth, len(specs), 3, 1, 1, 1)
        clip, self.rows = longs[:n], longs[n:].view(self.depth, len(specs))
        radius, grow, scale, phase, angle, spin = table[:, :6].unbind(1)  # each [n, 1]
        velocity, start = table[:, 6:8], table[:, 8:10]  # [n, 2 (x, y), 1]
        margin, period, span, lo, bouncing = table[:, 10:15, None].unbind(1)  # each [n, 1, 1]
        t = times.index_select(0, clip)  # [n, T]: each object at its own clip's times
        r = radius * (torch.remainder(t / GROW_PERIOD + phase, 1.0) * scale + grow)
        w = torch.remainder(velocity * t[:, None] + start + margin, period)  # [n, 2 (x, y), T]
        xy = lo + torch.where(bouncing > 0.5, span - (w - span).abs(), w)
        a = (spin * t + angle).view(n, steps, 1, 1)
        coords = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
        self.dx = coords.view(1, 1, 1, size) - xy[:, 0].view(n, steps, 1, 1)  # [n, T, 1, size]
        self.dy = coords.view(1, 1, size, 1) - xy[:, 1].view(n, steps, 1, 1)  # [n, T, size, 1]
        self.r, self.cos, self.sin = r.view(n, steps, 1, 1), torch.cos(a), torch.sin(a)
        self.minus_sin = -self.sin

    def coverage(self, shape: str, start: int, stop: int, out=None) -> torch.Tensor:
        """[stop - start, T, size, size]: how much of each pixel `shape` covers at those objects' poses."""
        s = slice(start, stop)
        cos, sin, r, dx, dy = self.cos[s], self.sin[s], self.r[s], self.dx[s], self.dy[s]
        px = (cos * dx + sin * dy) / r
        py = -(self.minus_sin[s] * dx + cos * dy) / r  # image rows point down, the distance functions' y up
        return torch.clamp(0.5 - shape_sdf(shape, px, py) * r * self.size, 0, 1, out=out)

    def images(self) -> torch.Tensor:
        """[count + 1, T, size, size] for the objects' images, the last row zero (a clip's missing object)."""
        images = torch.empty(self.count + 1, self.steps, self.size, self.size, device=self.r.device)
        images[-1].zero_()
        return images


def render(specs: list[ClipSpec], times: torch.Tensor, size: int = SIZE, device=None) -> torch.Tensor:
    """Video [B, 3, T, size, size] in 0..1 (float32) of each spec at `times` (seconds, [T] or [B, T]). The clips
    are drawn together, so the kernels launched do not grow with their number (up to _PIXELS)."""
    device = torch.device(device or "cpu")
    times = _clip_times_on(times, len(specs), device)
    video = torch.empty(len(specs), 3, times.shape[1], size, size, device=device)
    for start, stop in _pieces(0, len(specs), times.shape[1], size, device):
        _paint(specs[start:stop], times[start:stop], video[start:stop])
    return video


def _paint(specs: list[ClipSpec], times: torch.Tensor, video: torch.Tensor) -> None:
    """Fill video [B, 3, T, size, size] with the clips at times [B, T]: background, then each object over it."""
    size = video.shape[-1]
    video.copy_(_backgrounds(specs, size, video.device)[:, :, None].expand_as(video))
    objects = _Objects(specs, times, size)
    if not objects.count:
        return
    cover = objects.images()
    for shape, first, last in objects.spans:
        for start, stop in _pieces(first, last, times.shape[1], size, video.device):
            objects.coverage(shape, start, stop, out=cover[start:stop])
    alpha, paint, one = video.new_empty(video.shape[0], 1, *video.shape[2:]), torch.empty_like(video), torch.ones(())
    for k in range(objects.depth):  # each clip's objects in order, later ones over earlier ones
        torch.index_select(cover, 0, objects.rows[k], out=alpha[:, 0])
        torch.mul(alpha, objects.colours[k], out=paint)
        video.mul_(torch.sub(one, alpha, out=alpha)).add_(paint)  # video (1 - alpha) + alpha colour, no new buffers


def _clip_times_on(times, clips: int, device: torch.device) -> torch.Tensor:
    """[clips, T] times on the device, from [T] (shared by every clip) or [clips, T]."""
    times = upload(torch.as_tensor(times, dtype=torch.float32), device)
    return times.expand(clips, -1) if times.ndim == 1 else times


def outline(specs: list[ClipSpec], times: torch.Tensor, size: int = SIZE, device=None) -> torch.Tensor:
    """[B, 1, T, size, size] in 0..1: where each object's own shape differs from the average of all shapes at
    its pose (|its coverage - the mean coverage of SHAPES|, the largest over a clip's objects). Zero on the
    background and deep inside objects; high at a star's points, a square's corners, a ring's hole: the
    pixels only the shape word explains."""
    device = torch.device(device or "cpu")
    times = _clip_times_on(times, len(specs), device)
    out = torch.zeros(len(specs), 1, times.shape[1], size, size, device=device)
    for start, stop in _pieces(0, len(specs), times.shape[1], size, device):
        _outline(specs[start:stop], times[start:stop], out[start:stop])
    return out


def _outline(specs: list[ClipSpec], times: torch.Tensor, out: torch.Tensor) -> None:
    """`outline` of the clips at times [B, T] into out [B, 1, T, size, size], zero to begin with."""
    objects = _Objects(specs, times, out.shape[-1])
    if not objects.count:
        return
    apart = objects.images()  # first each object's own coverage, then how far it is from the mean
    for first, last in _pieces(0, objects.count, objects.steps, objects.size, out.device):
        total = None
        for shape in SHAPES:
            cover = objects.coverage(shape, first, last)
            for own, start, stop in objects.spans:  # copy out the cover of the objects of this shape
                start, stop = max(start, first), min(stop, last)
                if own == shape and start < stop:
                    apart[start:stop] = cover[start - first:stop - first]
            total = cover if total is None else total.add_(cover)  # (the first shape's cover is copied out above)
        torch.abs(apart[first:last] - total / len(SHAPES), out=apart[first:last])
    for k in range(objects.depth):
        torch.maximum(out, apart.index_select(0, objects.rows[k])[:, None], out=out)


def clip_times(frames: int, start: float = 0.0, device=None) -> torch.Tensor:
    """Times in seconds of `frames` consecutive frames at FPS (the same values on every device)."""
    return start + torch.arange(frames, dtype=torch.float32, device=device) / FPS


def clips(seeds, frames: int, size: int = SIZE, device=None) -> tuple[torch.Tensor, list[str]]:
    """Render the clips of these seeds: (video [B, 3, frames, size, size] in 0..1, captions)."""
    specs = [sample(int(s)) for s in seeds]
    return render(specs, clip_times(frames), size, device), [s.caption for s in specs]


def batches(batch: int, frames: int, size: int = SIZE, seed: int = 0, device=None, start: int = 0):
    """Endless training batches: batch i holds the clips of seeds seed*2**32 + (start+i)*batch + j."""
    i = start
    while True:
        base = seed * 2**32 + i * batch
        yield clips(range(base, base + batch), frames, size, device)
        i += 1


# -- measurement ----------------------------------------------------------------------------------------
_EXTENDED = torch.cat([_PALETTE, _PALETTE * BG_SHADE])  # full colours, then the darkest background shades
OBJECT_DISTANCE = 0.19  # max RGB distance (0..1 units) from a palette colour for a pixel to count as object


def frame_colours(frame) -> tuple[str, dict[str, float]]:
    """(background colour, {object colour: fraction of the frame}) of one frame.

    `frame`: [H, W, 3] uint8 or float 0..1 (or [3, H, W] float). Each pixel goes to the nearest of the 12
    palette colours and their darkest background shades. The background is the colour name (full or shade)
    that covers the most pixels; a pixel counts for an object colour when that colour's name is its nearest
    (full or shade), it lies within OBJECT_DISTANCE of the full colour, and the colour is not the
    background's. Antialiased edges, which blend two colours, mostly fall outside OBJECT_DISTANCE of any
    colour and are ignored.
    """
    pixels = _pixels(frame).reshape(-1, 3)
    names, full = _nearest(pixels)
    background = int(torch.bincount(names, minlength=len(_COLOUR_NAMES)).argmax())
    obj = full & (names != background)
    counts = torch.bincount(names[obj], minlength=len(_COLOUR_NAMES)).float() / pixels.shape[0]
    return _COLOUR_NAMES[background], {n: float(c) for n, c in zip(_COLOUR_NAMES, counts) if c > 0}


def _pixels(frame) -> torch.Tensor:
    """[H, W, 3] float 0..1 from [H, W, 3] uint8 or float, or [3, H, W] float."""
    x = torch.as_tensor(frame)
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if x.ndim == 3 and x.shape[0] == 3 and x.shape[-1] != 3:
        x = x.permute(1, 2, 0)
    return x


def _nearest(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For pixels [..., 3]: the index of the nearest palette colour name (full or shade), and whether the
    pixel lies within OBJECT_DISTANCE of that name's full colour (an object pixel, unless the colour is the
    background's). Not "nearer the full colour than the shade": black's darkest shade is 0.013 from black
    itself, so a black object decoded a shade darker than drawn (its interior at 11 of 255 against 15) read
    as background, a hollow ring, while no background of another colour comes near black."""
    flat = pixels.reshape(-1, 3)
    palette = _EXTENDED.to(pixels.device)
    idx = torch.cdist(flat, palette).argmin(dim=1) % len(_COLOUR_NAMES)
    near_full = (flat - palette[idx]).norm(dim=1) < OBJECT_DISTANCE
    shape = pixels.shape[:-1]
    return idx.reshape(shape), near_full.reshape(shape)


def object_mask(frame, colour: str) -> torch.Tensor:
    """[H, W] bool: the pixels `frame_colours` counts for the object colour `colour`."""
    names, full = _nearest(_pixels(frame))
    return full & (names == _COLOUR_NAMES.index(colour))


def pieces(mask: torch.Tensor, min_pixels: int = 12) -> int:
    """How many separate pieces (8-connected) of at least `min_pixels` pixels a [H, W] bool mask holds: one
    object drawn as several blobs counts several."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if ys.numel() == 0:
        return 0
    mask = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]  # the passes below cost by area
    h, w = mask.shape
    free = float(h * w)  # above every label: what the pixels outside the mask hold
    labels = torch.where(mask, torch.arange(h * w, dtype=torch.float32).view(h, w), free)
    while True:  # each pass lets the smallest label in a piece reach one pixel further
        spread = -F.max_pool2d(-labels[None, None], 3, stride=1, padding=1)[0, 0]
        spread = torch.where(mask, spread, free)
        if torch.equal(spread, labels):
            break
        labels = spread
    _, sizes = torch.unique(labels[mask], return_counts=True)
    return int((sizes >= min_pixels).sum())


def colour_counts(frame) -> dict[str, float]:
    """Fraction of the frame covered by each object colour, the background's colour left out."""
    return frame_colours(frame)[1]


def background_colour(frame) -> str:
    """The colour name of the frame's background: the one covering most pixels, full or shaded."""
    return frame_colours(frame)[0]


def dominant_colour(frame, min_fraction: float = 0.002) -> str | None:
    """The object colour covering most of the frame (background ignored), or None if no object shows."""
    counts = colour_counts(frame)
    if not counts:
        return None
    name, frac = max(counts.items(), key=lambda kv: kv[1])
    return name if frac >= min_fraction else None


def frames_of(video):
    """The frames of a clip, [3, T, H, W] float or [T, H, W, 3], one by one."""
    v = torch.as_tensor(video)
    return v.unbind(1) if (v.ndim == 4 and v.shape[0] == 3 and v.shape[-1] != 3) else v.unbind(0)


def majority(votes: list) -> str | None:
    """The most frequent of the votes that are not None (ties: the first name alphabetically)."""
    votes = [v for v in votes if v is not None]
    return max(sorted(set(votes)), key=votes.count) if votes else None


def dominant_colours(video) -> list[str | None]:
    """`dominant_colour` of each frame of a clip ([3, T, H, W] float or [T, H, W, 3])."""
    return [dominant_colour(f) for f in frames_of(video)]


def dominant_colour_of_clip(video) -> str | None:
    """Majority vote of `dominant_colour` over the frames of a clip (layouts as dominant_colours)."""
    return majority(dominant_colours(video))


def background_colour_of_clip(video) -> str | None:
    """Majority vote of `background_colour` over the frames of a clip (layouts as dominant_colours)."""
    return majority([background_colour(f) for f in frames_of(video)])
