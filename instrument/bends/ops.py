"""Bend operations as pure tensor functions.

Every function here runs inside the compiled (and CUDA-graph captured) streaming DiT, so:

* continuous parameters (gains, angles, sigmas, thresholds, mix weights) are tensors already on
  the device, 0-d unless stated; changing their values never changes a shape or a code path, so
  it never recompiles and never syncs with the host;
* structural choices (padding mode, maximum blur radius, pooling kernel, iteration counts) are
  keyword-only Python values; changing one is a patch change and may recompile;
* nothing reads a tensor back to the host (.item(), .tolist(), Python `if` on a tensor).

Python numbers are accepted for the continuous parameters too (handy offline and in tests), but
a compiled caller must pass tensors: dynamo specialises on Python numbers.

Layouts
-------
maps     [..., F, H, W]   anything image-like per frame: a prompt token's cross-attention
                          probabilities over query positions (see `attn_to_maps`), or hidden
                          states per channel (see `grid_to_maps`). Spatial ops act on H, W of
                          every frame alike.
grid     [B, F, H, W, C]  hidden states on the latent grid, channels last.
tokens   [B, F*H*W, C]    DiT tokens in Wan's order: frame-major, then row, then column
                          (token = f*H*W + h*W + w).
attn     [B, heads, Nq, T] attention probabilities, one row per query, over T keys (prompt tokens).

Weights `w` select and blend: 0 leaves an element bit-identical, 1 applies the bend fully, in
between blends linearly (see `mix`). They broadcast against the bent tensor, so a [C] vector
weighs channels of a grid, a [D] vector neurons of an FFN activation, and a [heads, 1, 1, 1, 1]
tensor heads of attention maps.

Geometry conventions (all maps, all ops): x grows to the right (W), y grows downwards (H);
positive `degrees` turn the picture counter-clockwise as seen on screen; `dx`, `dy` are fractions
of the width / height (+1 moves the picture one full width right / one full height down);
`scale` > 1 zooms in (the picture grows about the centre).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

PADDINGS = ("zeros", "border", "reflection")


# -- helpers --------------------------------------------------------------------------------------
def _param(v, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A parameter as a tensor on `like`'s device (a no-op for tensors already there)."""
    dtype = dtype or like.dtype
    if isinstance(v, torch.Tensor):
        return v.to(device=like.device, dtype=dtype)
    if isinstance(v, (int, float)):
        # A fill on the device, not a host-to-device copy: legal inside CUDA graph capture.
        return torch.full((), float(v), dtype=dtype, device=like.device)
    return torch.as_tensor(v, dtype=dtype, device=like.device)


def _work_dtype(x: Tensor) -> torch.dtype:
    # Sampling coordinates and blur kernels lose whole pixels in 16-bit floats: compute in fp32.
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _check_padding(padding: str) -> None:
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {', '.join(PADDINGS)}, not {padding!r}")


# -- mixing and guarding --------------------------------------------------------------------------
def mix(x: Tensor, bent: Tensor, w) -> Tensor:
    """x where w == 0 (bit-identical, whatever `bent` holds, NaN included), else x + w*(bent - x).

    The result has x's dtype; `w` broadcasts (per head / token / channel / neuron weights).
    """
    w = _param(w, x)
    return torch.where(w == 0, x, x + w * (bent.to(x.dtype) - x))


def scale_shift(x: Tensor, w, scale, shift=None) -> Tensor:
    """mix(x, x * scale + shift, w) as one multiply-add: x where w == 0 (bit-identical), else
    x * (1 + w * (scale - 1)) + w * shift, computed in at least float32.

    For bends whose bent value is affine in x: the per-unit factors are a vector the size of w, so the
    whole bend fuses into the kernel that produced x (the FFN's GELU) instead of writing a bent copy and
    reading it back to mix and check it.
    """
    work = torch.promote_types(x.dtype, torch.float32)
    w = _param(w, x, work)
    out = x.to(work) * (1.0 + w * (_param(scale, x, work) - 1.0))
    if shift is not None:
        out = out + w * _param(shift, x, work)
    return torch.where(w == 0, x, out.to(x.dtype))


def guard(t: Tensor, bound: float | None = None) -> tuple[Tensor, Tensor]:
    """Replace non-finite values; returns (clean, bad) with `bad` a 0-d float32 count of them.

    NaN becomes 0. Without `bound`, +-inf become 0 too; with a (structural) `bound`, +-inf become
    +-bound and finite values are clamped to [-bound, bound]. The count stays on the device: the
    caller accumulates it and reads it outside the hot path.
    """
    bad = (~torch.isfinite(t)).sum(dtype=torch.float32)
    if bound is None:
        clean = torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)
    else:
        b = float(bound)
        clean = torch.nan_to_num(t, nan=0.0, posinf=b, neginf=-b).clamp(-b, b)
    return clean, bad


# -- layouts --------------------------------------------------------------------------------------
def tokens_to_grid(x: Tensor, frames: int, height: int, width: int) -> Tensor:
    """[B, F*H*W, C] tokens -> [B, F, H, W, C] (a view)."""
    b, n, c = x.shape
    if n != frames * height * width:
        raise ValueError(f"{n} tokens do not make a {frames}x{height}x{width} grid")
    return x.view(b, frames, height, width, c)


def grid_to_tokens(g: Tensor) -> Tensor:
    """[B, F, H, W, C] -> [B, F*H*W, C]."""
    b, f, h, w, c = g.shape
    return g.reshape(b, f * h * w, c)


def grid_to_maps(g: Tensor) -> Tensor:
    """[B, F, H, W, C] -> [B, C, F, H, W] (a permuted view): one map per channel."""
    return g.permute(0, 4, 1, 2, 3)


def maps_to_grid(m: Tensor) -> Tensor:
    """[B, C, F, H, W] -> [B, F, H, W, C] (a permuted view)."""
    return m.permute(0, 2, 3, 4, 1)


def tokens_to_maps(x: Tensor, frames: int, height: int, width: int) -> Tensor:
    """[B, F*H*W, C] -> [B, C, F, H, W]."""
    return grid_to_maps(tokens_to_grid(x, frames, height, width))


def maps_to_tokens(m: Tensor) -> Tensor:
    """[B, C, F, H, W] -> [B, F*H*W, C]."""
    return grid_to_tokens(maps_to_grid(m))


def attn_to_maps(p: Tensor, frames: int, height: int, width: int) -> Tensor:
    """Attention [B, heads, F*H*W, T] -> [B, heads, T, F, H, W]: each key token's map over
    the query positions."""
    b, nh, nq, t = p.shape
    if nq != frames * height * width:
        raise ValueError(f"{nq} queries do not make a {frames}x{height}x{width} grid")
    return p.view(b, nh, frames, height, width, t).permute(0, 1, 5, 2, 3, 4)


def maps_to_attn(m: Tensor) -> Tensor:
    """[B, heads, T, F, H, W] -> [B, heads, F*H*W, T]."""
    b, nh, t, f, h, w = m.shape
    return m.permute(0, 1, 3, 4, 5, 2).reshape(b, nh, f * h * w, t)


def on_grid(x: Tensor, w, fn: Callable[..., Tensor], *args, **kwargs) -> Tensor:
    """Apply a maps op to every channel of a [B, F, H, W, C] grid, mixed by channel weights w."""
    bent = maps_to_grid(fn(grid_to_maps(x), *args, **kwargs))
    return mix(x, bent, w)


def on_tokens(x: Tensor, frames: int, height: int, width: int, w, fn: Callable[..., Tensor],
              *args, **kwargs) -> Tensor:
    """Apply a maps op to every channel of [B, F*H*W, C] tokens (Wan order), mixed by w."""
    g = tokens_to_grid(x, frames, height, width)
    return grid_to_tokens(on_grid(g, w, fn, *args, **kwargs))


# -- geometry -------------------------------------------------------------------------------------
def affine_theta(height: int, width: int, *, scale=1.0, degrees=0.0, dx=0.0, dy=0.0,
                 flip_h=0.0, flip_v=0.0, like: Tensor | None = None) -> Tensor:
    """The [2, 3] sampling matrix (normalised output coords -> input coords) of one affine warp.

    The picture is flipped first, then zoomed by `scale` and turned by `degrees` about the centre,
    then moved by (dx, dy). Rotation is done in pixel space, so non-square maps turn without shear.
    Flips are signs in the matrix, so a flip value between 0 and 1 squeezes the picture through
    zero width: no branch, and a knob on it folds the image.
    """
    like = like if like is not None else torch.empty(())
    dt = _work_dtype(like)
    s = _param(scale, like, dt).clamp_min(1e-3)
    r = _param(degrees, like, dt) * (math.pi / 180.0)
    tx = 2.0 * _param(dx, like, dt)
    ty = 2.0 * _param(dy, like, dt)
    fh = 1.0 - 2.0 * _param(flip_h, like, dt)
    fv = 1.0 - 2.0 * _param(flip_v, like, dt)
    c = torch.cos(r) / s
    sn = torch.sin(r) / s
    # Inverse rotation conjugated by the pixel aspect: D^-1 R^-1 D with D = diag(W/2, H/2).
    a00 = fh * c
    a01 = -fh * sn * (height / width)
    a10 = fv * sn * (width / height)
    a11 = fv * c
    b0 = -(a00 * tx + a01 * ty)
    b1 = -(a10 * tx + a11 * ty)
    return torch.stack([torch.stack([a00, a01, b0]), torch.stack([a10, a11, b1])])


def warp(p: Tensor, theta: Tensor, *, padding: str = "zeros", mode: str = "bilinear") -> Tensor:
    """Resample every frame of maps [..., F, H, W] through one [2, 3] affine `theta`."""
    _check_padding(padding)
    *lead, h, w = p.shape
    dt = _work_dtype(p)
    planes = p.reshape(1, -1, h, w).to(dt)
    grid = F.affine_grid(theta.to(dt).unsqueeze(0), [1, 1, h, w], align_corners=False)
    out = F.grid_sample(planes, grid, mode=mode, padding_mode=padding, align_corners=False)
    return out.reshape(p.shape).to(p.dtype)


def transform(p: Tensor, *, scale=1.0, degrees=0.0, dx=0.0, dy=0.0, flip_h=0.0, flip_v=0.0,
              padding: str = "zeros", mode: str = "bilinear") -> Tensor:
    """Zoom, rotate, translate and flip maps [..., F, H, W] in a single resampling."""
    h, w = p.shape[-2:]
    theta = affine_theta(h, w, scale=scale, degrees=degrees, dx=dx, dy=dy,
                         flip_h=flip_h, flip_v=flip_v, like=p)
    return warp(p, theta, padding=padding, mode=mode)


def zoom(p: Tensor, scale, *, padding: str = "zeros") -> Tensor:
    return transform(p, scale=scale, padding=padding)


def rotate(p: Tensor, degrees, *, padding: str = "zeros") -> Tensor:
    return transform(p, degrees=degrees, padding=padding)


def translate(p: Tensor, dx, dy, *, padding: str = "zeros") -> Tensor:
    return transform(p, dx=dx, dy=dy, padding=padding)


def flip(p: Tensor, h, v, *, padding: str = "zeros") -> Tensor:
    """Mirror left-right by h and top-bottom by v (0/1 tensors)."""
    return transform(p, flip_h=h, flip_v=v, padding=padding)


# -- filters --------------------------------------------------------------------------------------
def _pad_index(n: int, r: int, padding: str, device) -> Tensor:
    """Source index of each of the n + 2r padded positions ('border' / 'reflection')."""
    i = torch.arange(-r, n + r, device=device)
    if padding == "border":
        return i.clamp(0, n - 1)
    # Mirror about the edge (x[-1] = x[0]), periodic for radii beyond the size: grid_sample's
    # reflection with align_corners=False, so warps and blurs agree at the borders.
    m = torch.remainder(i, 2 * n)
    return torch.where(m >= n, 2 * n - 1 - m, m)


def _conv_along(x: Tensor, kernel: Tensor, dim: int, padding: str) -> Tensor:
    """Correlate x with a 1-d odd `kernel` along `dim`, padding as named."""
    r = (kernel.numel() - 1) // 2
    moved = x.movedim(dim, -1)
    shape = moved.shape
    n = shape[-1]
    rows = moved.reshape(-1, 1, n)
    if padding == "zeros":
        rows = F.pad(rows, (r, r))
    else:
        rows = rows.index_select(-1, _pad_index(n, r, padding, x.device))
    out = F.conv1d(rows, kernel.view(1, 1, -1))
    return out.reshape(shape).movedim(-1, dim)


def gaussian_kernel(sigma, radius: int, like: Tensor) -> Tensor:
    """Normalised gaussian taps over -radius..radius; sigma -> 0 gives the identity kernel."""
    dt = _work_dtype(like)
    s = _param(sigma, like, dt).clamp_min(1e-3)
    k = torch.arange(-radius, radius + 1, device=like.device, dtype=dt)
    g = torch.exp(-0.5 * (k / s) ** 2)
    return g / g.sum()


def blur(p: Tensor, sigma, *, radius: int = 4, padding: str = "zeros", frames: bool = False
         ) -> Tensor:
    """Gaussian blur of maps [..., F, H, W] over H and W (and over F too with frames=True).

    `radius` is the fixed number of taps each side (structural); sigma (in pixels) shapes them.
    Sigmas beyond about radius/2 are truncated by the radius.
    """
    _check_padding(padding)
    if radius < 0:
        raise ValueError("radius must be >= 0")
    dt = _work_dtype(p)
    k = gaussian_kernel(sigma, radius, p)
    out = p.to(dt)
    for d in ((-3, -2, -1) if frames else (-2, -1)):
        out = _conv_along(out, k, d, padding)
    return out.to(p.dtype)


def sharpen(p: Tensor, amount, sigma=1.0, *, radius: int = 4, padding: str = "border") -> Tensor:
    """Unsharp mask: p + amount * (p - blur(p, sigma))."""
    dt = _work_dtype(p)
    x = p.to(dt)
    soft = blur(x, sigma, radius=radius, padding=padding)
    return (x + _param(amount, x) * (x - soft)).to(p.dtype)


def amplify(p: Tensor, gain) -> Tensor:
    return p * _param(gain, p)


def contrast(p: Tensor, gamma) -> Tensor:
    """p**gamma on the positive part: gamma > 1 focuses an attention map, < 1 spreads it."""
    return p.clamp_min(0) ** _param(gamma, p)


def _pool(p: Tensor, size: int, iterations: int, sign: float) -> Tensor:
    if size < 1 or size % 2 == 0:
        raise ValueError("pooling size must be odd and >= 1")
    h, w = p.shape[-2:]
    x = p.reshape(-1, 1, h, w)
    if sign < 0:
        x = -x
    for _ in range(iterations):
        # max_pool2d pads with -inf, so the border only sees values inside the map.
        x = F.max_pool2d(x, size, stride=1, padding=size // 2)
    if sign < 0:
        x = -x
    return x.reshape(p.shape)


def dilate(p: Tensor, *, size: int = 3, iterations: int = 1) -> Tensor:
    """Grey dilation of every frame: max over a size x size window, `iterations` times."""
    return _pool(p, size, iterations, 1.0)


def erode(p: Tensor, *, size: int = 3, iterations: int = 1) -> Tensor:
    """Grey erosion of every frame: min over a size x size window, `iterations` times."""
    return _pool(p, size, iterations, -1.0)


def region_mask(height: int, width: int, box, feather, inside, like: Tensor) -> Tensor:
    """A soft box mask [H, W] sampled at pixel centres.

    box = (x0, y0, x1, y1) in 0..1 of the width / height; `feather` is the width (same units) of
    a linear ramp centred on each edge (0 = hard edge); inside = 1 keeps the box, 0 keeps the
    rest, values between blend the two.
    """
    dt = _work_dtype(like)
    b = _param(box, like, dt)
    f = _param(feather, like, dt).clamp_min(1e-6)
    u = (torch.arange(width, device=like.device, dtype=dt) + 0.5) / width
    v = (torch.arange(height, device=like.device, dtype=dt) + 0.5) / height
    rx = (0.5 + torch.minimum(u - b[0], b[2] - u) / f).clamp(0, 1)
    ry = (0.5 + torch.minimum(v - b[1], b[3] - v) / f).clamp(0, 1)
    m = ry[:, None] * rx[None, :]
    s = _param(inside, like, dt)
    return s * m + (1 - s) * (1 - m)


def region(p: Tensor, box, feather, inside) -> Tensor:
    """Keep maps [..., F, H, W] inside (or outside) a feathered box, zero elsewhere."""
    h, w = p.shape[-2:]
    return (p * region_mask(h, w, box, feather, inside, p)).to(p.dtype)


def renormalise(p: Tensor, dim: int = -1, eps: float = 1e-12) -> Tensor:
    """Make probabilities again after bending: negatives to 0, then each slice along `dim` sums
    to 1. A slice with nothing left (sum <= eps) becomes uniform rather than NaN."""
    q = p.clamp_min(0)
    s = q.sum(dim, keepdim=True)
    uniform = torch.full_like(q, 1.0 / q.shape[dim])
    return torch.where(s > eps, q / s.clamp_min(eps), uniform)


# -- layer operations (Network Bending) on channels-last activations ------------------------------
# Channel / neuron weights are the last-dim vector w; 0 leaves a channel bit-identical.
def ablate(x: Tensor, w) -> Tensor:
    return mix(x, torch.zeros_like(x), w)


def gain(x: Tensor, k, w) -> Tensor:
    """Scalar multiply."""
    return mix(x, x * _param(k, x), w)


def offset(x: Tensor, b, w) -> Tensor:
    return mix(x, x + _param(b, x), w)


def negate(x: Tensor, w) -> Tensor:
    """Invert for FFN activations: -x."""
    return mix(x, -x, w)


def invert(x: Tensor, w) -> Tensor:
    """Invert for unnormalised hidden states: reflect each channel about its mean.

    Network Bending's 1 - x assumes activations in 0..1; DiT hidden states are unbounded and
    centred anywhere, so the reflection 2*mean - x (mean over every position of a sample, per
    channel) keeps each channel's mean and spread and turns its picture upside down in value.
    The mean is over dims 1..-2, so [B, F, H, W, C] and [B, N, C] both work.
    """
    dims = tuple(range(1, x.ndim - 1))
    mean = x.mean(dim=dims, keepdim=True) if dims else x
    return mix(x, 2 * mean - x, w)


def threshold(x: Tensor, t, w, hi=1.0, lo=0.0) -> Tensor:
    """Binary threshold: hi where x > t, else lo."""
    hi_t = _param(hi, x)
    lo_t = _param(lo, x)
    return mix(x, torch.where(x > _param(t, x), hi_t, lo_t), w)


def cut(x: Tensor, t, w) -> Tensor:
    """ReLU-like threshold at t: x where x > t, else 0."""
    return mix(x, torch.where(x > _param(t, x), x, torch.zeros_like(x)), w)


def add_noise(x: Tensor, noise: Tensor, amount, w) -> Tensor:
    """x + amount * noise, with `noise` a preallocated buffer (see NoiseSource)."""
    return mix(x, x + _param(amount, x) * noise.to(x.dtype), w)


class NoiseSource:
    """A standard-normal buffer at a fixed address, refreshed in place by a seeded generator.

    Call `refresh()` outside the compiled / captured region (once per chunk, say); compiled code
    only reads `buffer`, so CUDA graphs see new noise without re-capture.
    """

    def __init__(self, shape, seed: int, device="cpu", dtype: torch.dtype = torch.float32):
        self.seed = int(seed)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(self.seed)
        self.buffer = torch.empty(tuple(shape), device=device, dtype=dtype)
        self.refresh()

    def refresh(self) -> Tensor:
        self.buffer.normal_(generator=self.generator)
        return self.buffer

    def reseed(self, seed: int) -> None:
        self.seed = int(seed)
        self.generator.manual_seed(self.seed)
        self.refresh()
