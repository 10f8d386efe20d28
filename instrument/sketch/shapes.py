"""Which shape an object in a frame has: a small CNN trained here, in a minute or two on a CPU, on the
procedural clips' own objects.

Colours can be read from pixels directly (`data.frame_colours`); shapes cannot, so `evaluate` trains this
reader and reports how often the shape it reads in a stream's frames is the caption's. It reads the mask
of one object colour (`data.object_mask`), cropped around the mask and scaled to CROP x CROP, so the
object's size and place do not matter, only its outline. It trains on single-object clips blurred by a
random amount, as a generated object is softer than a drawn one, and it is checked on held-out clips
(`accuracy`), sharp and blurred: the ceiling of any shape figure it gives.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import data

CROP = 32
SEEDS = 2**55  # clip seeds of the reader's training data: apart from the trainer's and the held-out captions
MAX_BLUR = 2.5  # Gaussian sigma in pixels at 128x128, the most a training frame is blurred


class ShapeReader(nn.Module):
    """mask crops [B, 1, CROP, CROP] -> logits [B, len(data.SHAPES)]."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * (CROP // 8) ** 2, 128), nn.ReLU(),
                                  nn.Linear(128, len(data.SHAPES)))

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(crops))

    @torch.no_grad()
    def read(self, frame, colour: str) -> str | None:
        """The shape of the `colour` object in one frame ([H, W, 3] uint8 or float), None if it does not show."""
        return self.read_mask(data.object_mask(frame, colour))

    @torch.no_grad()
    def read_mask(self, mask: torch.Tensor) -> str | None:
        """The shape an object mask ([H, W] bool, `data.object_mask`) outlines, None if it is too small."""
        crop = crop_mask(mask)
        if crop is None:
            return None
        return data.SHAPES[int(self(crop[None, None]).argmax())]


def crop_mask(mask: torch.Tensor, min_pixels: int = 12) -> torch.Tensor | None:
    """[CROP, CROP] float: the mask's bounding square (a margin around it, the mask centred), resampled;
    None when fewer than `min_pixels` pixels are set (no object)."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if ys.numel() < min_pixels:
        return None
    h, w = mask.shape
    cy, cx = (ys.min() + ys.max()).item() / 2 + 0.5, (xs.min() + xs.max()).item() / 2 + 0.5
    half = 0.6 * max((ys.max() - ys.min()).item() + 1, (xs.max() - xs.min()).item() + 1) + 1.0
    # affine_grid works in -1..1 of the source: the crop spans [cx - half, cx + half] of the mask's pixels
    theta = torch.tensor([[half / (w / 2), 0.0, cx / (w / 2) - 1.0], [0.0, half / (h / 2), cy / (h / 2) - 1.0]])
    grid = F.affine_grid(theta[None], [1, 1, CROP, CROP], align_corners=False)
    return F.grid_sample(mask.float()[None, None], grid, align_corners=False, padding_mode="zeros")[0, 0]


def blur(video: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of frames [..., H, W] (sigma in pixels; 0 leaves them as they are)."""
    if sigma <= 0:
        return video
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-x ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).to(video)
    shape = video.shape
    v = video.reshape(-1, 1, *shape[-2:])
    v = F.conv2d(F.pad(v, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    v = F.conv2d(F.pad(v, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))
    return v.reshape(shape)


def single_object_specs(start: int, count: int, object_scale: float = 1.0,
                        upright: bool = False) -> list[data.ClipSpec]:
    """The first `count` clips from seed `start` on that hold one object."""
    specs, seed = [], start
    while len(specs) < count:
        spec = data.sample(seed, object_scale, upright)
        if len(spec.instances) == 1:
            specs.append(spec)
        seed += 1
    return specs


def examples(start: int, count: int, max_blur: float = MAX_BLUR, seed: int = 0, progress=None):
    """(crops [N, 1, CROP, CROP], shape indices [N]) of single-object frames at random times and blurs;
    frames whose object is off screen are left out, so N <= count."""
    rng = np.random.default_rng(seed)
    crops, labels = [], []
    for j, spec in enumerate(single_object_specs(start, count)):
        if progress and j and j % 2000 == 0:
            progress(f"shape reader: {j}/{count} frames rendered")
        frame = data.render([spec], torch.tensor([float(rng.uniform(0, 4))]))[0, :, 0]  # [3, H, W]
        frame = blur(frame, float(rng.uniform(0, max_blur)))
        crop = crop_mask(data.object_mask(frame, spec.instances[0].colour))
        if crop is not None:
            crops.append(crop)
            labels.append(data.SHAPES.index(spec.instances[0].shape))
    return torch.stack(crops)[:, None], torch.tensor(labels)


def train(frames: int = 12000, epochs: int = 6, seed: int = 0, progress=None) -> ShapeReader:
    """A reader trained on `frames` single-object frames (seeded: the same reader every time on a CPU)."""
    progress = progress or (lambda *a: None)
    torch.manual_seed(seed)
    progress(f"shape reader: rendering {frames} training frames")
    x, y = examples(SEEDS, frames, seed=seed, progress=progress)
    reader = ShapeReader()
    opt = torch.optim.Adam(reader.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(len(x) / 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=g)
        total = 0.0
        for i in range(0, len(x), 128):
            idx = order[i:i + 128]
            loss = F.cross_entropy(reader(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        progress(f"shape reader: epoch {epoch + 1}/{epochs}, loss {total / len(x):.3f}")
    return reader.eval()


@torch.no_grad()
def accuracy(reader: ShapeReader, count: int = 1000, max_blur: float = MAX_BLUR, seed: int = 1) -> float:
    """The reader's accuracy on held-out single-object frames (seeds after its training data's)."""
    x, y = examples(SEEDS + 10**7, count, max_blur=max_blur, seed=seed)
    return (reader(x).argmax(1) == y).float().mean().item()
