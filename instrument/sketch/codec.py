"""The sketch codec: a small causal convolutional autoencoder with the Wan VAE's latent layout.

16 latent channels, /8 in space, /4 in time, and the Wan VAE's frame counts: latent frame 0 holds video
frame 0 alone and every later latent frame holds the next 4 frames, so a clip of 1 + 4k frames has 1 + k
latent frames. Time is causal: latent frame j depends on video frames up to 4j and decodes from latent
frames up to j, so a stream decodes chunk by chunk with a little carried state (`SketchStreamingDecoder`,
the same contract as the engine's `WanStreamingDecoder`).

Upsampling is sub-pixel (a conv to 4x the channels, then PixelShuffle), cheaper on a CPU than resizing.

How time enters: spatial layers are 2D convolutions applied frame by frame; the 4 frames of a latent frame
are stacked into channels (encoder) or split out of them (decoder); across latent frames there is one
causal convolution of kernel 2 in each direction (`CausalTime`), which is all the state a stream keeps.
The first latent frame is treated as 4 copies of frame 0 and decodes to 4 frames of which the last is kept.

Latents leave `encode` and enter `decode` normalised per channel (mean 0, std 1 over the training data, as
the DiT sees them); the statistics are buffers saved with the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.vae import check_latents, to_uint8_frames

__all__ = ["Codec", "SketchStreamingDecoder", "CONFIG"]

LATENT = 16
SPATIAL = 8
TEMPORAL = 4
CONFIG = dict(widths=(24, 48), latent_width=96, z_dim=LATENT)
WEIGHTS = "model.safetensors"


def latent_max(m: torch.Tensor) -> torch.Tensor:
    """[B, C, 1+4k, H, W] per video pixel -> [B, C, 1+k, H/8, W/8]: the largest value among the video pixels each
    latent pixel encodes (the first latent frame encodes frame 0 alone, each later one 4 frames)."""
    m = torch.cat([m[:, :, :1].expand(-1, -1, TEMPORAL - 1, -1, -1), m], dim=2)  # frame 0 fills a group
    return F.max_pool3d(m, kernel_size=(TEMPORAL, SPATIAL, SPATIAL))


class CausalTime(nn.Module):
    """A conv over (latent frames x space) with kernel 2 in time: frame j sees frames j-1 and j.

    The frame before the first of a stream is the first frame itself (replicate padding), in one-shot
    and streaming use alike.
    """

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv3d(c_in, c_out, (2, 3, 3), padding=(0, 1, 1))

    def forward(self, x: torch.Tensor, past: torch.Tensor | None = None):
        """x [B, C, F, H, W], past [B, C, 1, H, W] or None -> (y [B, C', F, H, W], this call's last frame)."""
        if past is None:
            past = x[:, :, :1]
        xx = torch.cat([past, x], dim=2)
        return self.conv(xx), x[:, :, -1:].detach()


class ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.gelu(self.conv1(F.gelu(x))))


def _frames_2d(x: torch.Tensor) -> torch.Tensor:
    """[B, C, F, H, W] -> [B*F, C, H, W]"""
    b, c, f, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def _frames_3d(x: torch.Tensor, b: int) -> torch.Tensor:
    """[B*F, C, H, W] -> [B, C, F, H, W]"""
    bf, c, h, w = x.shape
    return x.view(b, bf // b, c, h, w).permute(0, 2, 1, 3, 4)


class Encoder(nn.Module):
    def __init__(self, widths, latent_width, z_dim):
        super().__init__()
        c2, c3 = widths
        # Full resolution enters as 2x2 pixel blocks: no convolution runs at full size.
        self.frame = nn.Sequential(
            nn.PixelUnshuffle(2), nn.Conv2d(12, c2, 3, padding=1), nn.GELU(),
            nn.Conv2d(c2, c3, 3, stride=2, padding=1), nn.GELU(),
        )
        self.group = nn.Sequential(
            nn.Conv2d(TEMPORAL * c3, latent_width, 1), nn.GELU(),
            nn.Conv2d(latent_width, latent_width, 3, stride=2, padding=1), ResBlock(latent_width),
        )
        self.time = CausalTime(latent_width, latent_width)
        self.out = nn.Conv3d(latent_width, z_dim, 1)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        b, _, n, h, w = video.shape
        x = video * 2 - 1
        x = torch.cat([x[:, :, :1].expand(-1, -1, TEMPORAL - 1, -1, -1), x], dim=2)  # frame 0 fills its group
        f = x.shape[2] // TEMPORAL
        y = self.frame(_frames_2d(x))  # [B*4F, c3, H/4, W/4]
        y = y.view(b * f, TEMPORAL * y.shape[1], *y.shape[2:])  # a latent frame's 4 frames as channels
        y = _frames_3d(self.group(y), b)
        y, _ = self.time(y)
        return self.out(F.gelu(y))


class Decoder(nn.Module):
    def __init__(self, widths, latent_width, z_dim):
        super().__init__()
        c2, c3 = widths
        self.inp = nn.Conv3d(z_dim, latent_width, 1)
        self.time = CausalTime(latent_width, latent_width)
        self.low = ResBlock(latent_width)
        self.up = nn.Sequential(
            nn.Conv2d(latent_width, 4 * latent_width // 2, 3, padding=1), nn.PixelShuffle(2),
            nn.GELU(), nn.Conv2d(latent_width // 2, TEMPORAL * c3, 1),
        )
        self.frame = nn.Sequential(
            nn.GELU(),
            nn.Conv2d(c3, 4 * c2, 3, padding=1), nn.PixelShuffle(2), nn.GELU(),
            nn.Conv2d(c2, 12, 3, padding=1), nn.PixelShuffle(2),  # 2x2 pixel blocks out, as they came in
        )

    def forward(self, z: torch.Tensor, past: torch.Tensor | None = None):
        """z [B, z_dim, F, h, w] -> (frames [B, 3, 4F, H, W] in about -1..1, the time conv's state)."""
        b, _, f, _, _ = z.shape
        y, state = self.time(self.inp(z), past)
        y = self.up(self.low(_frames_2d(F.gelu(y))))  # [B*F, 4*c3, 2h, 2w]
        y = y.view(b * f * TEMPORAL, y.shape[1] // TEMPORAL, *y.shape[2:])
        return _frames_3d(self.frame(y), b), state


class Codec(nn.Module):
    """encode: video [B, 3, 1+4k, H, W] in 0..1 -> normalised latents [B, 16, 1+k, H/8, W/8]; decode: back."""

    def __init__(self, widths=CONFIG["widths"], latent_width=CONFIG["latent_width"], z_dim=CONFIG["z_dim"]):
        super().__init__()
        self.config = dict(widths=tuple(widths), latent_width=int(latent_width), z_dim=int(z_dim))
        self.encoder = Encoder(widths, latent_width, z_dim)
        self.decoder = Decoder(widths, latent_width, z_dim)
        self.register_buffer("latent_mean", torch.zeros(z_dim))
        self.register_buffer("latent_std", torch.ones(z_dim))

    @property
    def z_dim(self) -> int:
        return self.config["z_dim"]

    def encode_raw(self, video: torch.Tensor) -> torch.Tensor:
        if video.ndim != 5 or video.shape[1] != 3 or (video.shape[2] - 1) % TEMPORAL:
            raise ValueError(f"expected video [B, 3, 1+4k, H, W], got {list(video.shape)}")
        if video.shape[3] % SPATIAL or video.shape[4] % SPATIAL:
            raise ValueError(f"height and width must be multiples of {SPATIAL}, got {list(video.shape[3:])}")
        return self.encoder(video)

    def decode_raw(self, z: torch.Tensor, past: torch.Tensor | None = None):
        """Raw latents -> (frames [B, 3, n, H, W] in 0..1 unclamped, state). n = 4F, or 4F-3 from a stream's start."""
        video, state = self.decoder(z, past)
        if past is None:
            video = video[:, :, TEMPORAL - 1:]  # the first latent frame keeps only its last frame: frame 0
        return video * 0.5 + 0.5, state

    def _stats(self, z):
        shape = (1, -1, 1, 1, 1)
        return self.latent_mean.view(shape).to(z.dtype), self.latent_std.view(shape).to(z.dtype)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(video)
        return (self.encode_raw(video) - mean) / std

    def denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(latents)
        return latents * std + mean

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """All latent frames of a stream at once -> frames [B, 3, 4F-3, H, W] in 0..1."""
        return self.decode_raw(self.denormalise(latents))[0].clamp(0, 1)

    # -- files -------------------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"_class_name": "SketchCodec", **self.config, "spatial_stride": SPATIAL,
                  "temporal_stride": TEMPORAL}
        (folder / "config.json").write_text(json.dumps(config, indent=1))
        save_file({k: v.detach().float().contiguous() for k, v in self.state_dict().items()},
                  str(folder / WEIGHTS))
        return folder

    @classmethod
    def load(cls, folder: str | Path, device="cpu") -> "Codec":
        from safetensors.torch import load_file

        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text())
        if config.get("_class_name") != "SketchCodec":
            raise ValueError(f"{folder}: not a sketch codec (config _class_name {config.get('_class_name')!r})")
        codec = cls(config["widths"], config["latent_width"], config["z_dim"])
        codec.load_state_dict(load_file(str(folder / WEIGHTS), device=str(device)), strict=True)
        return codec.to(device).eval().requires_grad_(False)


class SketchStreamingDecoder:
    """Streams latent chunks [1, 16, f, h, w] (normalised, as the DiT makes them) to frames.

    The first chunk after `reset()` gives 4f - 3 frames, every later one 4f: the frame counts of the
    engine's `WanStreamingDecoder`, and chunk-by-chunk output equals `Codec.decode` of all chunks at once.
    """

    def __init__(self, codec: Codec):
        self.codec = codec
        self._past: torch.Tensor | None = None
        self._latent_size: tuple[int, int, int] | None = None

    @property
    def spatial_stride(self) -> int:
        return SPATIAL

    @property
    def temporal_stride(self) -> int:
        return TEMPORAL

    @property
    def device(self) -> torch.device:
        return next(self.codec.decoder.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.codec.decoder.parameters()).dtype

    def reset(self) -> None:
        self._past = None
        self._latent_size = None

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The next chunk [1, 16, f, h, w] -> uint8 frames [n, H, W, 3]."""
        return to_uint8_frames(self.decode_float(latents))

    @torch.no_grad()
    def decode_float(self, latents: torch.Tensor) -> torch.Tensor:
        """The next chunk [B, 16, f, h, w] -> float frames [B, 3, n, H, W] in 0..1."""
        check_latents(latents, self.codec.z_dim)
        size = (latents.shape[0], latents.shape[3], latents.shape[4])
        if self._latent_size is not None and self._latent_size != size:
            raise ValueError(f"chunk of size {'x'.join(map(str, size))} in a stream of "
                             f"{'x'.join(map(str, self._latent_size))}: call reset() before changing the latent size")
        z = self.codec.denormalise(latents.to(device=self.device, dtype=self.dtype))
        video, self._past = self.codec.decode_raw(z, self._past)
        self._latent_size = size
        return video.clamp_(0.0, 1.0)
