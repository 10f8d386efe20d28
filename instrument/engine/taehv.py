"""TAEHV: a tiny autoencoder for Wan 2.1 latents, with a streaming frame decoder.

The architecture of madebyollin/taehv (Ollin Boer Bohan) with the key layout of its published
weights `taew2_1.pth`, so the user's downloaded file loads as is. The network is 2D convolutions
applied frame by frame; time enters through:

- MemBlock: a residual block that also sees its own input from the previous frame
  (zeros at the start of a stream), so memory across chunks is one frame per MemBlock;
- TGrow: a 1x1 conv making `stride` frames out of each frame (decoder, x4 in time overall);
- TPool: a 1x1 conv merging `stride` consecutive frames into one (encoder, /4 in time).

Facts the engine relies on (from the taehv source and README):

- It consumes latents exactly as the DiT produces them (normalised space): TAEHV was trained
  on them, so no latents_mean / latents_std is applied, unlike the Wan VAE.
- Each latent frame gives 4 frames, and the first 3 frames of a stream are dropped to align
  with the Wan VAE. So the first latent frame of a stream gives 1 frame and each later one 4:
  the same counts as `WanStreamingDecoder`, though the first frame is not made the Wan way
  (Wan decodes it alone with no temporal upsampling; TAEHV makes 4 and keeps the last).
- Output frames are RGB in [0, 1] (the Wan VAE: [-1, 1]); both decoders here return [0, 1].
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from instrument.errors import UserError
from instrument.engine.vae import check_latents, to_uint8_frames

__all__ = ["TAEHV", "TAEHVStreamingDecoder"]

LATENT_CHANNELS = 16  # Wan 2.1
IMAGE_CHANNELS = 3
ENCODER_WIDTH = 64
DECODER_WIDTHS = (256, 128, 64, 64)
DECODER_TIME_UPSCALE = (1, 2, 2)  # per stage; the published weights grow time in the last two
ENCODER_TIME_DOWNSCALE = (2, 2, 1)
WEIGHTS_HINT = "TAEHV weights for Wan 2.1 (taew2_1.pth or .safetensors from github.com/madebyollin/taehv)"


def conv3x3(n_in: int, n_out: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)


class Clamp(nn.Module):
    """Soft clamp to (-3, 3): keeps out-of-distribution latents (a bent DiT) from blowing up."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """Residual conv block fed with its input at this frame and at the previous frame."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            conv3x3(n_in * 2, n_out), nn.ReLU(inplace=True),
            conv3x3(n_out, n_out), nn.ReLU(inplace=True),
            conv3x3(n_out, n_out),
        )  # fmt: skip
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(torch.cat([x, past], 1)) + self.skip(x))


class TPool(nn.Module):
    """Merges `stride` consecutive frames (stacked along the batch axis) into one."""

    def __init__(self, n_f: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f * stride, n_f, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, c, h, w = x.shape
        return self.conv(x.reshape(-1, self.stride * c, h, w))


class TGrow(nn.Module):
    """Makes `stride` consecutive frames out of each frame (stacked along the batch axis)."""

    def __init__(self, n_f: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f, n_f * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, c, h, w = x.shape
        return self.conv(x).reshape(-1, c, h, w)


def run_with_memory(
    layers: nn.Sequential, x: torch.Tensor, batch: int, memory: dict[int, torch.Tensor] | None = None
) -> torch.Tensor:
    """Apply `layers` to frames x [batch * T, C, H, W] (time-major within each batch item).

    All frames of the chunk go through each layer at once; a MemBlock's previous frame is the
    chunk's own previous frame, or for the chunk's first frame `memory[i]` (the last input that
    block saw in the previous chunk), zeros when `memory` is None. `memory[i]` is overwritten in
    place with this chunk's last input, so its buffers keep their addresses.
    """
    for i, layer in enumerate(layers):
        if isinstance(layer, MemBlock):
            frames = x.view(batch, -1, *x.shape[1:])
            last = memory[i].unsqueeze(1) if memory is not None else torch.zeros_like(frames[:, :1])
            past = torch.cat([last, frames[:, :-1]], 1).view(x.shape)
            if memory is not None:
                memory[i].copy_(frames[:, -1])
            x = layer(x, past)
        else:
            x = layer(x)
    return x


def _decode_frames(layers: nn.Sequential, x: torch.Tensor, batch: int, memory: dict[int, torch.Tensor]) -> torch.Tensor:
    """The decoder's layers over a chunk's frames, clamped to [0, 1]: what the streaming decoder compiles."""
    return run_with_memory(layers, x, batch, memory).clamp(0, 1)


class TAEHV(nn.Module):
    """Tiny video autoencoder for Wan 2.1 latents (published layout: `encoder.N.*`, `decoder.N.*`).

    `TAEHV(state_dict)` or `TAEHV.from_file(path)` load weights; `TAEHV()` has random weights.
    A state dict holding only `decoder.*` keys gives a decoder-only model (`encoder` is None).
    `decode_video` / `encode_video` work on whole videos and are differentiable (for training);
    streaming display goes through `TAEHVStreamingDecoder`.
    """

    def __init__(self, state_dict: Mapping[str, torch.Tensor] | None = None, *, with_encoder: bool = True) -> None:
        super().__init__()
        if state_dict is not None:
            with_encoder = any(k.startswith("encoder.") for k in state_dict)
        self.encoder = self._build_encoder() if with_encoder else None
        self.decoder = self._build_decoder()
        self.t_upscale = 1
        for layer in self.decoder:
            if isinstance(layer, TGrow):
                self.t_upscale *= layer.stride
        self.t_downscale = 1
        for layer in self.encoder or ():
            if isinstance(layer, TPool):
                self.t_downscale *= layer.stride
        # The Wan VAE makes 1 frame from the first latent frame; TAEHV makes t_upscale and is
        # trained so that its last one lines up with it.
        self.frames_to_trim = self.t_upscale - 1
        self.spatial_stride = 8
        if state_dict is not None:
            self.load_published(state_dict)

    @staticmethod
    def _build_encoder() -> nn.Sequential:
        n = ENCODER_WIDTH
        layers: list[nn.Module] = [conv3x3(IMAGE_CHANNELS, n), nn.ReLU(inplace=True)]
        for stride in ENCODER_TIME_DOWNSCALE:
            layers += [TPool(n, stride), conv3x3(n, n, stride=2, bias=False)]
            layers += [MemBlock(n, n), MemBlock(n, n), MemBlock(n, n)]
        layers.append(conv3x3(n, LATENT_CHANNELS))
        return nn.Sequential(*layers)

    @staticmethod
    def _build_decoder() -> nn.Sequential:
        n = DECODER_WIDTHS
        layers: list[nn.Module] = [Clamp(), conv3x3(LATENT_CHANNELS, n[0]), nn.ReLU(inplace=True)]
        for stage, stride in enumerate(DECODER_TIME_UPSCALE):
            width = n[stage]
            layers += [MemBlock(width, width), MemBlock(width, width), MemBlock(width, width)]
            layers += [nn.Upsample(scale_factor=2), TGrow(width, stride), conv3x3(width, n[stage + 1], bias=False)]
        layers += [nn.ReLU(inplace=True), conv3x3(n[3], IMAGE_CHANNELS)]
        return nn.Sequential(*layers)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> TAEHV:
        """Load published TAEHV weights (.pth or .safetensors); UserError if the file is not that."""
        state_dict = load_state_dict(path)
        try:
            model = cls(state_dict)
        except ValueError as e:
            raise UserError(f"{path}: {e}; expected {WEIGHTS_HINT}") from None
        return model.eval()

    def load_published(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load weights in the published key layout; ValueError naming any key or shape mismatch."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        if missing or unexpected:
            parts = [
                f"{len(keys)} {label} key{'s' if len(keys) > 1 else ''} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                for label, keys in (("missing", missing), ("unexpected", unexpected))
                if keys
            ]
            raise ValueError("; ".join(parts))
        fitted = {}
        for key, value in state_dict.items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{key} is a {type(value).__name__}, not a tensor")
            want = own[key].shape
            if value.shape != want and self._is_tgrow_key(key) and value.shape[0] % want[0] == 0:
                # A TGrow trained with more output frames than this model makes: keep the
                # channels of its last frame, the one aligned with the following frame.
                value = value[-want[0]:]
            if value.shape != want:
                raise ValueError(f"{key} has shape {list(value.shape)}, expected {list(want)}")
            fitted[key] = value
        self.load_state_dict(fitted)

    def _is_tgrow_key(self, key: str) -> bool:
        part, index, *_ = key.split(".")
        return part == "decoder" and isinstance(self.decoder[int(index)], TGrow)

    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, 16, T, h, w] (DiT space) -> frames [B, 3, 4T - 3, 8h, 8w] in [0, 1]."""
        check_latents(latents, LATENT_CHANNELS)
        batch = latents.shape[0]
        x = latents.transpose(1, 2).flatten(0, 1)
        x = run_with_memory(self.decoder, x, batch).clamp(0, 1)
        video = x.view(batch, -1, *x.shape[1:])[:, self.frames_to_trim :]
        return video.transpose(1, 2)

    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames [B, 3, T, H, W] in [0, 1] -> latents [B, 16, ceil(T / 4), H / 8, W / 8] (DiT space).

        T is padded at the end to a multiple of 4 by repeating the last frame, as the original does.
        """
        if self.encoder is None:
            raise RuntimeError("this TAEHV was loaded without encoder weights")
        if frames.ndim != 5 or frames.shape[1] != IMAGE_CHANNELS:
            raise ValueError(f"expected frames of shape [B, 3, T, H, W], got {list(frames.shape)}")
        batch, _, t = frames.shape[:3]
        pad = -t % self.t_downscale
        if pad:
            frames = torch.cat([frames, frames[:, :, -1:].expand(-1, -1, pad, -1, -1)], 2)
        x = run_with_memory(self.encoder, frames.transpose(1, 2).flatten(0, 1), batch)
        return x.view(batch, -1, *x.shape[1:]).transpose(1, 2)


class TAEHVStreamingDecoder:
    """Streams latent chunks through TAEHV's decoder, same contract as `WanStreamingDecoder`.

    `decode(latents)` takes a chunk [1, 16, f, h, w] in the DiT's latent space (as is, no
    de-normalisation) and returns uint8 frames [n, H, W, 3] on the model's device: n = 4f, or
    4f - 3 for the first chunk after `reset()`. State between chunks is one frame per MemBlock
    (9 small tensors), kept in buffers allocated on the first chunk and then rewritten in place.
    """

    def __init__(self, model: TAEHV) -> None:
        self.model = model
        self._memory: dict[int, torch.Tensor] = {}
        self._memory_key: tuple | None = None
        self._to_trim = model.frames_to_trim
        self._fresh = True
        # On a GPU the steady chunk is replayed from a CUDA graph (the engine sets this with its own graphs):
        # eager, the decoder's ~60 small kernels leave the GPU waiting on the host's launches.
        self.graphs = False
        self.captures = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_key: tuple | None = None
        self._graph_in: torch.Tensor | None = None
        self._graph_out: torch.Tensor | None = None
        self._warm_key: tuple | None = None  # the size whose first steady chunk ran eagerly, before its capture
        # The engine sets this to its own torch.compile backend ("inductor" on a GPU), which can fuse each
        # convolution's bias, ReLU and residual add and pick a channels-last layout, where eager cuDNN
        # converts every convolution's input to NHWC and back. A chunk of a new size compiles on its first,
        # eager-run call, never inside a CUDA graph's capture.
        self.compile = None
        self.progress = lambda message: None
        self._compiled = None
        self._compiled_with = None
        self._compile_failed = False  # once failed, never tried again: each try would cost the stream time

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> TAEHVStreamingDecoder:
        return cls(TAEHV.from_file(path))

    @property
    def spatial_stride(self) -> int:
        return self.model.spatial_stride

    @property
    def temporal_stride(self) -> int:
        return self.model.t_upscale

    @property
    def device(self) -> torch.device:
        return next(self.model.decoder.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.decoder.parameters()).dtype

    def reset(self) -> None:
        """Start a new stream (empty temporal memory, first frames trimmed again)."""
        self._to_trim = self.model.frames_to_trim
        self._fresh = True

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode the next chunk [1, 16, f, h, w] of the stream to uint8 frames [n, H, W, 3]."""
        if self.graphs and latents.is_cuda and not self._fresh and not self._to_trim:
            return self._decode_graphed(latents)
        return to_uint8_frames(self.decode_float(latents))

    def _decode_graphed(self, latents: torch.Tensor) -> torch.Tensor:
        """A steady chunk (past the first, trimmed one) from a CUDA graph: the first such chunk of a size runs
        eagerly (cuDNN picks its kernels, allocations settle), the next is captured, every later one replayed.
        The capture records the memory's in-place update without running it, so the stream's state advances
        once per chunk either way; reset() zeroes the memory in place, so the graph stays valid."""
        key = (tuple(latents.shape), latents.dtype, latents.device, self._memory_key)
        if key != self._graph_key:
            if key != self._warm_key:
                self._graph, self._graph_key, self._warm_key = None, None, key
                return to_uint8_frames(self.decode_float(latents))
            self._graph_in = latents.clone()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._graph_out = to_uint8_frames(self.decode_float(self._graph_in))
            self._graph, self._graph_key = graph, key
            self.captures += 1
        self._graph_in.copy_(latents)
        self._graph.replay()
        return self._graph_out.clone()  # the graph's output is rewritten by the next replay

    @torch.no_grad()
    def decode_float(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode the next chunk [B, 16, f, h, w] to float frames [B, 3, n, H, W] in [0, 1]."""
        check_latents(latents, LATENT_CHANNELS)
        batch, _, _, height, width = latents.shape
        device, dtype = self.device, self.dtype
        key = (batch, height, width, device, dtype)
        if not self._fresh and key != self._memory_key:
            raise ValueError(
                f"chunk of size {batch}x{height}x{width} ({dtype} on {device}) does not continue this stream: "
                "call reset() before changing the latent size"
            )
        if self._fresh:
            self._prepare_memory(key)
            self._fresh = False
        x = latents.to(device=device, dtype=dtype).transpose(1, 2).flatten(0, 1)
        x = self._run_decoder(x, batch)
        video = x.view(batch, -1, *x.shape[1:])
        if self._to_trim:
            trimmed = min(self._to_trim, video.shape[1])
            video = video[:, trimmed:]
            self._to_trim -= trimmed
        return video.transpose(1, 2)

    def _run_decoder(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        if not self.compile or self._compile_failed:
            return _decode_frames(self.model.decoder, x, batch, self._memory)
        if self._compiled is None or self._compiled_with is not self.compile:
            self.progress("tiny decoder: compiling with torch.compile on its first chunk")
            self._compiled = torch.compile(_decode_frames, dynamic=False, backend=self.compile)
            self._compiled_with = self.compile
        try:
            return self._compiled(self.model.decoder, x, batch, self._memory)
        except Exception as e:  # a compiler failure must not stop the stream: the eager decoder is the same
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise
            self.progress(f"tiny decoder: torch.compile failed ({type(e).__name__}: {str(e)[:200]}); "
                          "decoding eagerly from now on")
            self._compile_failed = True
            return _decode_frames(self.model.decoder, x, batch, self._memory)

    def _prepare_memory(self, key: tuple) -> None:
        """Zero the memory buffers, allocating them only when the stream's size or device changed."""
        if key == self._memory_key:
            for buffer in self._memory.values():
                buffer.zero_()
            return
        batch, height, width, device, dtype = key
        self._memory = {}
        for i, layer in enumerate(self.model.decoder):
            if isinstance(layer, nn.Upsample):
                height, width = height * 2, width * 2
            elif isinstance(layer, MemBlock):
                channels = layer.conv[0].in_channels // 2
                self._memory[i] = torch.zeros((batch, channels, height, width), device=device, dtype=dtype)
        self._memory_key = key


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a .pth (torch.load, weights only) or .safetensors file; UserError if it is neither."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file; expected {WEIGHTS_HINT}")
    safetensors = path.suffix == ".safetensors"
    try:
        if safetensors:
            from safetensors.torch import load_file

            state_dict = load_file(str(path), device="cpu")
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e}); expected {WEIGHTS_HINT}") from None
    except Exception:
        # Garbage makes torch.load / safetensors raise anything from IndexError to their own
        # types, and torch's message suggests weights_only=False, which would run code from the file.
        kind = "a safetensors file" if safetensors else "a PyTorch weights file (or one holding more than tensors)"
        raise UserError(f"{path}: not {kind}; expected {WEIGHTS_HINT}") from None
    if not isinstance(state_dict, Mapping) or not all(isinstance(k, str) for k in state_dict):
        raise UserError(f"{path}: holds a {type(state_dict).__name__}, not a state dict; expected {WEIGHTS_HINT}")
    return dict(state_dict)
