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
            spin = float(rng.choice([-1, 1]) * rng.uniform(1.0, 2.5)) if g.motion == "rotating" else 0.0
            x, y, angle = float(rng.uniform(0.2, 0.8)), float(rng.uniform(0.2, 0.8)), float(rng.uniform(0, 2 * math.pi))
            instances.append(Instance(g.shape, g.colour, g.motion, x, y, radius, 0.0 if upright else angle,
                                      vx, vy, spin, float(rng.uniform(0, 1))))
    bg = (float(rng.choice([0.0, 0.25, 0.5, 0.75]) * math.pi), float(rng.uniform(0.08, 0.2)),
          float(rng.integers(0, 2**31 - 1)))
    return ClipSpec(seed, description, tuple(instances), bg)


def reshaped(spec: ClipSpec, rng: np.random.Generator) -> ClipSpec:
    """The same clip with its first group's objects drawn as another shape, one their motion allows (a rotating
    group never becomes circles or rings), and the caption saying so; everything else (positions, sizes,
    angles, colours, motions, background) unchanged. The training's twin pairs: the shape word is all that
    tells the two clips apart."""
    group = spec.description.groups[0]
    shape = str(rng.choice([s for s in SHAPES
                            if s != group.shape and not (group.motion == "rotating" and s in SYMMETRIC)]))
    groups = (replace(group, shape=shape), *spec.description.groups[1:])
    instances = tuple(replace(inst, shape=shape) if j < group.count else inst  # the first group's come first
                      for j, inst in enumerate(spec.instances))
    return replace(spec, description=replace(spec.description, groups=groups), instances=instances)


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


def _tri(u, length):
    """Triangle wave: position of a point bouncing between 0 and length."""
    return length - (torch.remainder(u, 2 * length) - length).abs()


def _pose(inst: Instance, t: torch.Tensor):
    """Centre, radius and angle of an instance at times t (seconds)."""
    r = torch.full_like(t, inst.radius)
    if inst.motion == "growing":
        r = inst.radius * (0.55 + 0.9 * torch.remainder(t / GROW_PERIOD + inst.phase, 1.0))
    elif inst.motion == "shrinking":
        r = inst.radius * (1.45 - 0.9 * torch.remainder(t / GROW_PERIOD + inst.phase, 1.0))
    if inst.motion == "bouncing":
        lo, span = inst.radius, 1.0 - 2 * inst.radius
        x = lo + _tri(inst.x - lo + inst.vx * t, span)
        y = lo + _tri(inst.y - lo + inst.vy * t, span)
    else:
        margin = 1.2 * inst.radius  # wrap around just off screen
        x = -margin + torch.remainder(inst.x + inst.vx * t + margin, 1 + 2 * margin)
        y = -margin + torch.remainder(inst.y + inst.vy * t + margin, 1 + 2 * margin)
    return x, y, r, inst.angle + inst.spin * t


def upload(tensor: torch.Tensor, device) -> torch.Tensor:
    """A tensor on the device; from the host without waiting: a plain copy from pageable memory makes the host
    wait for all the GPU work queued before it, which would starve the GPU between training steps."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)  # already there ("cuda" names the tensor's "cuda:0" too), or no GPU to wait for


_PALETTES: dict = {}


def _palette(device) -> torch.Tensor:
    """The palette [colours, 3] on a device, copied there once."""
    device = torch.device(device)
    if device not in _PALETTES:
        _PALETTES[device] = _PALETTE.to(device)
    return _PALETTES[device]


def _background(spec: ClipSpec, size: int, device) -> torch.Tensor:
    """[3, size, size] in 0..1: shades of the background colour only."""
    d = spec.description
    colour = _palette(device)[_COLOUR_NAMES.index(d.background_colour)]
    coords = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    angle, period, noise_seed = spec.background_params
    u = x * math.cos(angle) + y * math.sin(angle)
    sharp = period * size / (2 * math.pi)  # antialias the pattern edges over about one pixel
    if d.background == "plain":
        v = torch.ones_like(x)
    elif d.background == "striped":
        v = (torch.sin(2 * math.pi * u / period) * sharp + 0.5).clamp(0, 1)
    elif d.background == "checkered":
        w = -x * math.sin(angle) + y * math.cos(angle)
        v = (torch.sin(2 * math.pi * u / period) * torch.sin(2 * math.pi * w / period) * sharp + 0.5).clamp(0, 1)
    elif d.background == "gradient":
        v = (u - u.min()) / (u.max() - u.min())
    else:  # noisy: smooth value noise
        g = torch.Generator().manual_seed(int(noise_seed))
        grid = upload(torch.rand(1, 1, 7, 7, generator=g), device)  # drawn on the CPU: the same on every device
        v = F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=True)[0, 0].clamp(0, 1)
    return colour.view(3, 1, 1) * (BG_SHADE + (1 - BG_SHADE) * v)


def render(specs: list[ClipSpec], times: torch.Tensor, size: int = SIZE, device=None) -> torch.Tensor:
    """Video [B, 3, T, size, size] in 0..1 (float32) of each spec at `times` (seconds, [T] or [B, T])."""
    device = torch.device(device or "cpu")
    times = _clip_times_on(times, len(specs), device)
    steps = times.shape[1]
    video = torch.stack([_background(s, size, device) for s in specs])[:, :, None].repeat(1, 1, steps, 1, 1)
    for b, spec in enumerate(specs):
        clip = video[b]  # [3, T, H, W], painted in place, objects in order
        for inst in spec.instances:
            alpha = _coverage(inst, (inst.shape,), times[b], size)[0]
            colour = _palette(device)[_COLOUR_NAMES.index(inst.colour)].view(3, 1, 1, 1)
            clip.mul_(1 - alpha).add_(alpha * colour)
    return video


def _clip_times_on(times, clips: int, device: torch.device) -> torch.Tensor:
    """[clips, T] times on the device, from [T] (shared by every clip) or [clips, T]."""
    times = upload(torch.as_tensor(times, dtype=torch.float32), device)
    return times.expand(clips, -1) if times.ndim == 1 else times


def _coverage(inst: Instance, shapes, times: torch.Tensor, size: int) -> torch.Tensor:
    """[len(shapes), T, size, size]: how much of each pixel these shapes would cover at the instance's pose."""
    steps, device = times.shape[0], times.device
    coords = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
    gy, gx = coords.view(1, size, 1), coords.view(1, 1, size)
    x, y, r, a = (v.view(steps, 1, 1) for v in _pose(inst, times))
    dx, dy = gx - x, gy - y
    cos, sin = torch.cos(a), torch.sin(a)
    px = (cos * dx + sin * dy) / r
    py = -(-sin * dx + cos * dy) / r  # image rows point down, the distance functions' y up
    return torch.stack([(0.5 - shape_sdf(s, px, py) * r * size).clamp(0, 1) for s in shapes])


def outline(specs: list[ClipSpec], times: torch.Tensor, size: int = SIZE, device=None) -> torch.Tensor:
    """[B, 1, T, size, size] in 0..1: where each object's own shape differs from the average of all shapes at
    its pose (|its coverage - the mean coverage of SHAPES|, the largest over a clip's objects). Zero on the
    background and deep inside objects; high at a star's points, a square's corners, a ring's hole: the
    pixels only the shape word explains."""
    device = torch.device(device or "cpu")
    times = _clip_times_on(times, len(specs), device)
    out = torch.zeros(len(specs), 1, times.shape[1], size, size, device=device)
    for b, spec in enumerate(specs):
        for inst in spec.instances:
            cover = _coverage(inst, SHAPES, times[b], size)
            own = cover[SHAPES.index(inst.shape)]
            out[b, 0] = torch.maximum(out[b, 0], (own - cover.mean(0)).abs())
    return out


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
    that covers the most pixels; a pixel counts for an object colour when its nearest entry is that full
    colour, within OBJECT_DISTANCE, and not the background's. Antialiased edges, which blend two colours,
    mostly fall outside OBJECT_DISTANCE of any colour and are ignored.
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
    pixel is that full colour within OBJECT_DISTANCE (an object pixel, unless the colour is the background's)."""
    dist = torch.cdist(pixels.reshape(-1, 3), _EXTENDED.to(pixels.device))
    best, idx = dist.min(dim=1)
    shape = pixels.shape[:-1]
    return (idx % len(_COLOUR_NAMES)).reshape(shape), ((idx < len(_COLOUR_NAMES)) & (best < OBJECT_DISTANCE)).reshape(shape)


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
