"""data.render and data.outline, batched over clips and objects, against the loop they replaced.

The reference below is the renderer as it was before batching (clip by clip, object by object), kept here
verbatim so the batched one is held to it on fresh random clips every run: same values up to a few float32
ulps (batched transcendental functions), same painting order, each clip at its own times.
"""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from instrument.sketch import data
from instrument.sketch.data import BG_SHADE, GROW_PERIOD, SHAPES, ClipSpec, Instance, shape_sdf


# -- the reference: the loop implementation, as it was -------------------------------------------------------
def _tri(u, length):
    return length - (torch.remainder(u, 2 * length) - length).abs()


def _pose(inst: Instance, t: torch.Tensor):
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
        margin = 1.2 * inst.radius
        x = -margin + torch.remainder(inst.x + inst.vx * t + margin, 1 + 2 * margin)
        y = -margin + torch.remainder(inst.y + inst.vy * t + margin, 1 + 2 * margin)
    return x, y, r, inst.angle + inst.spin * t


def _coverage(inst: Instance, shapes, times: torch.Tensor, size: int) -> torch.Tensor:
    steps, device = times.shape[0], times.device
    coords = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
    gy, gx = coords.view(1, size, 1), coords.view(1, 1, size)
    x, y, r, a = (v.view(steps, 1, 1) for v in _pose(inst, times))
    dx, dy = gx - x, gy - y
    cos, sin = torch.cos(a), torch.sin(a)
    px = (cos * dx + sin * dy) / r
    py = -(-sin * dx + cos * dy) / r
    return torch.stack([(0.5 - shape_sdf(s, px, py) * r * size).clamp(0, 1) for s in shapes])


def _colour(name: str, device) -> torch.Tensor:
    return (torch.tensor(data.COLOURS[name], dtype=torch.float32) / 255.0).to(device)


def _background(spec: ClipSpec, size: int, device) -> torch.Tensor:
    d = spec.description
    colour = _colour(d.background_colour, device)
    coords = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    angle, period, noise_seed = spec.background_params
    u = x * math.cos(angle) + y * math.sin(angle)
    sharp = period * size / (2 * math.pi)
    if d.background == "plain":
        v = torch.ones_like(x)
    elif d.background == "striped":
        v = (torch.sin(2 * math.pi * u / period) * sharp + 0.5).clamp(0, 1)
    elif d.background == "checkered":
        w = -x * math.sin(angle) + y * math.cos(angle)
        v = (torch.sin(2 * math.pi * u / period) * torch.sin(2 * math.pi * w / period) * sharp + 0.5).clamp(0, 1)
    elif d.background == "gradient":
        v = (u - u.min()) / (u.max() - u.min())
    else:
        g = torch.Generator().manual_seed(int(noise_seed))
        grid = torch.rand(1, 1, 7, 7, generator=g).to(device)
        v = F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=True)[0, 0].clamp(0, 1)
    return colour.view(3, 1, 1) * (BG_SHADE + (1 - BG_SHADE) * v)


def _times(times, clips: int, device) -> torch.Tensor:
    times = torch.as_tensor(times, dtype=torch.float32).to(device)
    return times.expand(clips, -1) if times.ndim == 1 else times


def reference_render(specs, times, size=data.SIZE, device=None) -> torch.Tensor:
    device = torch.device(device or "cpu")
    times = _times(times, len(specs), device)
    steps = times.shape[1]
    video = torch.stack([_background(s, size, device) for s in specs])[:, :, None].repeat(1, 1, steps, 1, 1)
    for b, spec in enumerate(specs):
        clip = video[b]
        for inst in spec.instances:
            alpha = _coverage(inst, (inst.shape,), times[b], size)[0]
            colour = _colour(inst.colour, device).view(3, 1, 1, 1)
            clip.mul_(1 - alpha).add_(alpha * colour)
    return video


def reference_outline(specs, times, size=data.SIZE, device=None) -> torch.Tensor:
    device = torch.device(device or "cpu")
    times = _times(times, len(specs), device)
    out = torch.zeros(len(specs), 1, times.shape[1], size, size, device=device)
    for b, spec in enumerate(specs):
        for inst in spec.instances:
            cover = _coverage(inst, SHAPES, times[b], size)
            own = cover[SHAPES.index(inst.shape)]
            out[b, 0] = torch.maximum(out[b, 0], (own - cover.mean(0)).abs())
    return out


# -- random clips that cover every kind ----------------------------------------------------------------------
def _kinds(spec: ClipSpec) -> set:
    return ({("shape", i.shape) for i in spec.instances} | {("motion", i.motion) for i in spec.instances}
            | {("background", spec.description.background), ("objects", len(spec.instances))})


EVERY_KIND = ({("shape", s) for s in SHAPES} | {("motion", m) for m in data.MOTIONS}
              | {("background", b) for b in data.BACKGROUNDS} | {("objects", n) for n in (1, 2, 3)})


def random_specs(rng: np.random.Generator, count: int = 24) -> list[ClipSpec]:
    """`count` clips from fresh seeds (object scale 1 or 2, upright or not) that between them hold every shape,
    motion, background and number of objects; a few are `reshaped` twins of others, and one has no objects."""
    chosen, seen = [], set()
    while seen != EVERY_KIND and len(chosen) < 4000:
        spec = data.sample(int(rng.integers(0, 2**62)), float(rng.choice([1.0, 2.0])), bool(rng.random() < 0.5))
        if not _kinds(spec) <= seen or len(chosen) < count // 2:
            chosen.append(spec)
            seen |= _kinds(spec)
    assert seen == EVERY_KIND, EVERY_KIND - seen
    twins = [data.reshaped(s, rng) for s in chosen[:3]]
    empty = dataclasses.replace(chosen[-1], instances=())
    specs = chosen + twins + [empty]
    order = rng.permutation(len(specs))
    return [specs[i] for i in order]


@pytest.fixture
def rng():
    return np.random.default_rng()  # fresh clips every run


# a CPU draws a few clips at a time; a GPU all at once, as the largest budget does here; the smallest draws one
# clip and one object at a time
BUDGETS = [None, 1, 2**40]


@pytest.mark.parametrize("pixels", BUDGETS)
@pytest.mark.parametrize("size", [32, 64])
def test_batched_render_is_the_loop_render(rng, size, pixels, monkeypatch):
    if pixels:
        monkeypatch.setitem(data._PIXELS, "cpu", pixels)
    specs = random_specs(rng)
    clips = len(specs)
    shared = torch.tensor([0.0, *rng.uniform(0, 10, 4), 100.0], dtype=torch.float32)
    own = torch.tensor(rng.uniform(0, 120, (clips, 5)), dtype=torch.float32)  # each clip its own times
    own[rng.integers(0, clips), 0] = 100.0
    for times in (shared, own):
        got = data.render(specs, times, size)
        assert got.shape == (clips, 3, times.shape[-1], size, size) and got.dtype == torch.float32
        torch.testing.assert_close(got, reference_render(specs, times, size), rtol=0, atol=1e-5)


@pytest.mark.parametrize("pixels", BUDGETS)
def test_batched_outline_is_the_loop_outline(rng, pixels, monkeypatch):
    if pixels:
        monkeypatch.setitem(data._PIXELS, "cpu", pixels)
    specs = random_specs(rng, 12)
    times = torch.tensor(rng.uniform(0, 120, (len(specs), 3)), dtype=torch.float32)
    got = data.outline(specs, times, 32)
    assert got.shape == (len(specs), 1, 3, 32, 32)
    torch.testing.assert_close(got, reference_outline(specs, times, 32), rtol=0, atol=1e-5)


def test_batching_does_not_mix_clips_and_noise_is_the_same_every_time(rng, monkeypatch):
    monkeypatch.setitem(data._PIXELS, "cpu", 2**40)  # the whole batch at once
    specs = random_specs(rng, 10)
    times = torch.tensor(rng.uniform(0, 30, (len(specs), 4)), dtype=torch.float32)
    batch = data.render(specs, times, 32)
    for b, spec in enumerate(specs):
        torch.testing.assert_close(batch[b], data.render([spec], times[b:b + 1], 32)[0], rtol=0, atol=1e-6)
    noisy = [s for s in specs if s.description.background == "noisy"]
    assert noisy and torch.equal(data.render(noisy, times[0], 32), data.render(noisy[::-1], times[0], 32).flip(0))
