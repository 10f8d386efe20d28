"""Chunk-by-chunk decoding of Wan 2.1 latents to video frames with the full Wan VAE.

The streaming engine hands over latent chunks of shape [B, 16, f, h, w] (f = 1 or 3) in the
DiT's normalised latent space. `WanStreamingDecoder` turns each chunk into display frames
while keeping the VAE decoder's causal feature cache alive between chunks, so a stream
decoded chunk by chunk gives the same frames as one diffusers `vae.decode` of all latents
concatenated: the first latent frame of a stream gives 1 video frame, every later one 4.

This module also holds what every frame decoder shares (`FrameDecoder`, `to_uint8_frames`),
and imports diffusers only when a Wan decoder is built, so the tiny decoder stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan

__all__ = ["FrameDecoder", "WanStreamingDecoder", "to_uint8_frames"]


class FrameDecoder(Protocol):
    """What the engine needs from a streaming decoder (Wan VAE or TAEHV)."""

    @property
    def spatial_stride(self) -> int: ...

    @property
    def temporal_stride(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def reset(self) -> None: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """[1, 3, n, H, W] float frames in [0, 1] -> uint8 [n, H, W, 3] RGB, rows top to bottom.

    `video` is scratch: it is scaled in place, so the only allocation is the result.
    Rounds like diffusers' VideoProcessor (x * 255, round half to even), so frames match
    what the diffusers pipeline would have saved.
    """
    if video.shape[0] != 1:
        raise ValueError(f"uint8 frames are produced for one stream at a time, got batch {video.shape[0]}")
    _, _, n, height, width = video.shape
    video = video.mul_(255.0).round_().clamp_(0.0, 255.0)
    frames = torch.empty((n, height, width, 3), dtype=torch.uint8, device=video.device)
    frames.copy_(video[0].permute(1, 2, 3, 0))
    return frames


def check_latents(latents: torch.Tensor, channels: int) -> None:
    """Refuse a chunk that cannot be a [B, channels, f, h, w] latent chunk, naming what is wrong."""
    if latents.ndim != 5 or latents.shape[1] != channels or min(latents.shape) == 0:
        raise ValueError(
            f"expected latents of shape [B, {channels}, frames, height, width], got {list(latents.shape)}"
        )
    if not latents.is_floating_point():
        raise ValueError(f"expected floating-point latents, got {latents.dtype}")


class WanStreamingDecoder:
    """Streams Wan latent chunks through a diffusers `AutoencoderKLWan` decoder.

    `decode(latents)` takes a chunk [1, z, f, h, w] in the DiT's normalised latent space and
    returns uint8 frames [n, H, W, 3] on the VAE's device, with n = 4f, except for the first
    chunk after `reset()`, where n = 4f - 3. Nothing is copied to the host.

    The stream's cache lives in this object, not in the VAE (diffusers keeps its own in
    `vae._feat_map`), so the same VAE may encode or decode other things between chunks.
    """

    def __init__(self, vae: AutoencoderKLWan) -> None:
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

        if getattr(vae, "decoder", None) is None:
            raise ValueError("this AutoencoderKLWan has no decoder")
        config = vae.config
        self.vae = vae
        self._z_dim = int(config.z_dim)
        self._patch_size = config.patch_size
        self._spatial_stride = 2 ** (len(config.dim_mult) - 1) * (config.patch_size or 1)
        self._temporal_stride = 2 ** sum(bool(t) for t in config.temperal_downsample)
        # The pipeline passes `latents / (1 / std) + mean` to the VAE: keep both as tensors
        # once per device and dtype rather than rebuilding them for every chunk.
        self._mean_list = [float(v) for v in config.latents_mean]
        self._std_list = [float(v) for v in config.latents_std]
        if len(self._mean_list) != self._z_dim or len(self._std_list) != self._z_dim:
            raise ValueError("VAE config latents_mean / latents_std do not have z_dim entries")
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None
        # Every causal conv of the decoder keeps its last (at most 2) input frames here.
        self._cache: list = [None] * sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
        self._cache_index = [0]
        self._latent_size: tuple[int, int, int] | None = None

    @property
    def spatial_stride(self) -> int:
        """Pixels per latent cell along height and width (8 for Wan 2.1)."""
        return self._spatial_stride

    @property
    def temporal_stride(self) -> int:
        """Video frames per latent frame after the first of a stream (4 for Wan 2.1)."""
        return self._temporal_stride

    @property
    def device(self) -> torch.device:
        return next(self.vae.decoder.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.decoder.parameters()).dtype

    def reset(self) -> None:
        """Start a new stream: the next chunk's first latent frame decodes to a single frame."""
        for i in range(len(self._cache)):
            self._cache[i] = None
        self._latent_size = None

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode the next chunk [1, z, f, h, w] of the stream to uint8 frames [n, H, W, 3]."""
        return to_uint8_frames(self.decode_float(latents))

    @torch.no_grad()
    def decode_float(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode the next chunk [B, z, f, h, w] to float frames [B, 3, n, H, W] in [0, 1]."""
        check_latents(latents, self._z_dim)
        batch, _, _, height, width = latents.shape
        if self._latent_size is not None and self._latent_size != (batch, height, width):
            raise ValueError(
                f"chunk of size {batch}x{height}x{width} in a stream of {'x'.join(map(str, self._latent_size))}: "
                "call reset() before changing the latent size"
            )
        device, dtype = self.device, self.dtype
        mean, std = self._latent_stats(device, dtype)
        z = torch.addcmul(mean, latents.to(device=device, dtype=dtype), std)
        x = self.vae.post_quant_conv(z)
        if self._latent_size is None:
            # The first latent frame of a stream must go alone: diffusers' decoder marks its
            # temporal upsamplers on that call and emits one frame instead of four.
            self._latent_size = (batch, height, width)
            first = self._run(x[:, :, :1], first_chunk=True)
            video = first if x.shape[2] == 1 else torch.cat([first, self._run(x[:, :, 1:])], dim=2)
        else:
            video = self._run(x)
        if self._patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            video = unpatchify(video, patch_size=self._patch_size)
        return video.clamp_(-1.0, 1.0).add_(1.0).mul_(0.5)

    def _run(self, x: torch.Tensor, first_chunk: bool = False) -> torch.Tensor:
        self._cache_index[0] = 0
        return self.vae.decoder(x, feat_cache=self._cache, feat_idx=self._cache_index, first_chunk=first_chunk)

    def _latent_stats(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self._stats is None or self._stats[0].device != device or self._stats[0].dtype != dtype:
            shape = (1, self._z_dim, 1, 1, 1)
            mean = torch.tensor(self._mean_list, device=device, dtype=dtype).view(shape)
            std = torch.tensor(self._std_list, device=device, dtype=dtype).view(shape)
            self._stats = (mean, std)
        return self._stats
