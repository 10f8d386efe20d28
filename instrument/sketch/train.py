"""Train the sketch model: the codec, then a small causal Wan DiT, on procedural clips made on the fly.

    python -m instrument.sketch.train --out runs/sketch --minutes 25 --device cuda
    python -m instrument.sketch.train --out runs/sketch --minutes 25 --device cuda --resume   # continue

Stage 1 trains the codec (instrument/sketch/codec.py) to reconstruct clips, then measures its latents'
per-channel mean and std so the DiT sees unit-scale latents. Stage 2 freezes the codec and trains the
transformer (diffusers WanTransformer3DModel, small config) together with a small umT5 text encoder, by
flow matching with block-causal attention over chunks of latent frames, laid out as the streaming engine
runs it (instrument/engine/stream.py):

- a sequence of S latent frames appears twice: clean (timestep 0, what the engine's clean pass writes into
  the KV cache) and noised (each chunk at its own sigma, drawn from the engine's 4-step schedule);
- a clean frame sees the clean frames of its own and earlier chunks; a noised chunk sees itself and the clean
  frames of earlier chunks; both only within the engine's sink + rolling window (teacher forcing);
- the loss is the flow-matching velocity error (noise - x0) on the noised tokens;
- half the batches put a gap in time and in RoPE positions after the sink chunk, as a long stream's cache
  does (sink frames at 0.., window frames hundreds of frames later), so nothing breaks when the stream is long.

The budget --minutes counts training time over all runs of one --out folder; the codec gets
`codec_fraction` of it. --codec-steps / --dit-steps fix the step counts instead (exact reproduction).
Checkpoints (every --checkpoint-every steps and on exit, SIGINT/SIGTERM included) are written atomically
into OUT/checkpoints/ as safetensors plus a JSON state; --resume continues from the latest, bit for bit:
batches are a function of the step number, and noise comes from a generator saved with the checkpoint.
The model lands in OUT/model/: transformer/, text_encoder/, tokenizer/, codec/, model_index.json.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..engine.dit import TokenGrid, rope_tables
from ..engine.stream import SCHEDULE, SHIFT, warp
from ..errors import UserError, module_main
from ..progress import Progress
from . import data
from .codec import TEMPORAL, Codec, latent_max

TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=6, attention_head_dim=32, in_channels=16, out_channels=16,
    text_dim=128, freq_dim=64, ffn_dim=640, num_layers=8, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)
TEXT_ENCODER = dict(d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4, relative_attention_num_buckets=16,
                    relative_attention_max_distance=32, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
CODEC = dict(widths=(24, 48), latent_width=96, z_dim=16)
MAX_BYTES = 25 * 10**6
# what a model folder's DiT weights are: the EMA (shipped), or the optimizer's own, the EMA's lag measured
EXPORT_WEIGHTS = ("ema", "training")
# how the folder stores the DiT and text encoder: float16 halves them (the engine loads either as its own
# dtype), room under MAX_BYTES for a DiT twice the shipped one's parameters
EXPORT_DTYPES = ("float32", "float16")
SWAP_MIN_SIGMA = 0.5  # Config.opening_swap's and Config.clip_swap's lowest sigma


@dataclass
class Config:
    size: int = 128
    chunk: int = 3  # latent frames per chunk, as the engine streams
    sink: int = 3
    window: int = 12
    latent_frames: int = 15  # per training sequence: the sink chunk and a full window
    gap_prob: float = 0.5
    max_gap: int = 240  # latent frames (960 video frames, one minute at 16 fps)
    text_len: int = 32
    shift: float = SHIFT  # the 4 timesteps below warped with this shift are the sigmas trained on
    schedule: tuple = SCHEDULE  # timesteps (0..1000) the engine samples with, one per step
    sampler: str = "ddim"  # how the engine samples it (plain flow matching: keep the implied noise)
    export_dtype: str = "float32"  # EXPORT_DTYPES: how the model folder stores the DiT and text encoder
    # Share of chunks whose sigma is drawn uniformly in (0, 1) instead of from the schedule: the model then
    # serves other 4-step schedules too, so the shipped schedule is chosen by measuring (evaluate --schedule)
    # rather than fixed before training.
    sigma_uniform: float = 0.5
    transformer: dict = field(default_factory=lambda: dict(TRANSFORMER))
    text_encoder: dict = field(default_factory=lambda: dict(TEXT_ENCODER))
    codec: dict = field(default_factory=lambda: dict(CODEC))
    codec_batch: int = 16
    codec_frames: int = 17
    codec_lr: float = 5e-4
    codec_noise: float = 0.05  # latent noise while training the codec: a decoder that tolerates DiT errors
    # Objects cover a few percent of a frame: pixels far from the frame's median colour (objects, mostly)
    # weigh 1 + codec_object_weight x that distance in the codec's loss, so it cannot buy its loss with
    # the background alone.
    codec_object_weight: float = 8.0
    codec_fraction: float = 0.2
    # As codec_object_weight, for the DiT's flow-matching loss, per latent pixel: 1 + dit_object_weight x
    # the largest distance from the median among the video pixels it encodes (8x8 of them, over 4 frames),
    # normalised to a mean of 1 per clip.
    dit_object_weight: float = 4.0
    # And + dit_outline_weight x the largest `data.outline` of those pixels: where the object's own shape
    # differs from the average shape at its pose, the only pixels the shape word explains (the third run's
    # DiT ignored its shape words: README, word use). 0 leaves the weights as they were.
    dit_outline_weight: float = 0.0
    # The sink chunk's loss weighs this many times a window chunk's (then the clip's weights are scaled back
    # to a mean of 1). Only the first chunk is drawn from the words alone: every later chunk can copy its
    # objects' shapes from the context, so a shape word that the first chunk ignores costs the loss little
    # (the third run's DiT ignored its shape words). 1 leaves the weights as they were.
    dit_sink_weight: float = 1.0
    # Share of each DiT batch made of twin pairs: a clip and the same clip with its first group drawn as
    # another shape (data.reshaped), noised with the same noise at the same sigmas, side by side. Between
    # the two, the shape word is all that explains the difference, so its gradient is less buried under the
    # noise's (a one-off check on the third run's model: signal-to-noise 0.36 against 0.29). 0: none.
    dit_twins: float = 0.0
    # Share of the DiT's clips (full clips and openings) made to rotate in place (data.spun), on top of the
    # one group in eight that `data.sample` draws rotating. The shipped model draws a rotating object's
    # first frame right and rounds it into a disc after (4 of 18 validation captions right, every other
    # motion 174 of 182: README). 0: the clips as drawn.
    dit_rotating: float = 0.0
    # Every rotating object of the DiT's clips turns clockwise (data.one_way) instead of either way. Which
    # way is a coin toss the caption does not name, so the model's clean prediction for the first four-frame
    # latent is the mean of both: a probe on 40 rotating clips through the codec read their shape in 279 of
    # 320 frames (frames 1 to 8) as drawn, 269 in the mean of 16 speeds one way round, 115 in the mean of both
    # ways, and the shipped model's stream 87 (README: "Which way it turns"). False: either way, as drawn.
    one_way_spin: bool = False
    # Every rotating object of the DiT's clips turns at this many radians a second (data.steady) instead of
    # a speed drawn from 1 to 2.5, so that a later chunk need not read the turn rate off the chunks before
    # it. The one-way fourteenth run draws the first chunk's rotating outline and rounds it in the later
    # chunks; a 630-step CPU A/B at one speed rounded them as the control did (README: "Fourteenth run"),
    # so the speeds' spread is not shown to be the cause. 0: as drawn.
    spin_speed: float = 0.0
    # Openings per DiT step, besides the dit_batch full clips: other clips' first chunk alone, noised, with
    # no context, as a stream's first chunk is drawn: from the words alone. It is the one chunk that must
    # draw an object's shape from its shape word (every later chunk can copy it from its context), and the
    # runs before openings ignored their shape words. An opening costs a fraction of a full clip (one chunk
    # instead of latent_frames clean and noised frames, no mask). Twin pairs (dit_twins) lead the openings
    # too. 0: none. (The shipped sixth run trained with 128: its words came 1.8 times sooner, README.)
    dit_openings: int = 0
    # Openings noised to a sigma drawn uniformly from [opening_sigma_floor, 1] instead of as a full clip's chunks
    # are. From a real clip noised to sigma 0.6 or less the shipped model's clean prediction keeps its shape
    # (32 of 40 clips, the codec alone 36); from 0.9 on it keeps it no better than chance, with the caption's
    # shape word or another (README): the outline is decided from the words alone above about 0.8, and an
    # opening below that teaches the shape word nothing. 0: openings are noised as full clips are.
    opening_sigma_floor: float = 0.0
    # Twin-pair openings noised from each other's latents: a clip's caption and target, its twin's outline (the
    # same pose, another shape) under the noise. In every other clip the noised frames and the caption agree,
    # so the model learns to copy the outline it sees and not to draw the one it is told (the shipped model's
    # clean prediction from a clip noised to sigma 0.8 keeps that clip's shape in 24 of 40 cases with another
    # shape word, and shows the word's in 3: README). Here only the word gives the outline. Pairs noised below
    # sigma SWAP_MIN_SIGMA are left as they are: the target's (x_t - x0) / sigma grows without bound there.
    opening_swap: bool = False
    # The same for the full clips' noised chunks, each twin keeping its own clean context. Trained with
    # opening_swap alone, the eighth run draws the word's outline in a stream's first chunk (70-75% of
    # captions, frame by frame) and loses it in the second (30-34% by its last frame: README). A later chunk
    # is trained only on full clips, whose noised frames always show the right outline, so it copies whatever
    # outline they show: after a real first chunk, a second noised from its twin at sigma 0.6 comes out with
    # the twin's outline in 24 of 40 clips (`evaluate.later_chunk_denoising`); 590 CPU steps of full clips with
    # clip_swap took that to 3, and without it to 22 (README: "Eighth run").
    clip_swap: bool = False
    # Share of each DiT batch whose clean context is the model's own prediction instead of the real frames:
    # the x0 it predicts from the last step's noise level, which is what the engine's context pass caches.
    # Trained only on real context, the model meets its own blurrier chunks at streaming time and lets
    # the objects fade (exposure bias, what Self-Forcing trains against).
    self_context: float = 0.5
    # Every object's radius times this (data.sample): objects of 12 to 40 pixels become 2 to 5 latent pixels,
    # too few for the shipped codec to keep their outline (79% of shapes survive it; 89% at 1.5, 93% at 2;
    # upright, 88% at 1.6 and 94% at 2).
    object_scale: float = 1.0
    # Every object starts upright (angle 0; rotating ones turn from there) instead of at a random angle. The
    # engine's few steps give the flow-matching x0 prediction, the mean over what the noise still hides: over
    # random angles a star's mean is a blob, so streams showed blobs of the right colour and size whatever
    # the shape word (14 of 100 shapes at chance).
    upright: bool = False
    dit_batch: int = 32
    dit_lr: float = 3e-4
    # The last share of the DiT's budget (its minutes, or --dit-steps; counted over every part of a run, a
    # --dit-from part's included) over which the learning rate falls linearly to 0. At a constant rate the
    # eleventh run's shapes stopped climbing at about 80-85% from a third of the way on; if that is the
    # rate's noise, a cooldown takes it out at the end.
    dit_cooldown: float = 0.0
    warmup: int = 200
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema: float = 0.999
    seed: int = 0

    @classmethod
    def tiny(cls) -> "Config":
        """A few-second CPU config for tests and smoke runs."""
        return cls(size=32, chunk=2, sink=2, window=4, latent_frames=6, max_gap=8, text_len=16,
                   transformer=dict(TRANSFORMER, num_attention_heads=2, attention_head_dim=12, text_dim=16,
                                    freq_dim=16, ffn_dim=32, num_layers=2),
                   text_encoder=dict(TEXT_ENCODER, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2),
                   codec=dict(widths=(8, 8), latent_width=16, z_dim=16),
                   codec_batch=2, codec_frames=5, dit_batch=2, warmup=5, ema=0.9, codec_lr=3e-3, dit_lr=3e-3)

    @classmethod
    def proxy(cls) -> "Config":
        """The shipped model and codec with CPU-sized batches: a check of the recipe on a machine without a
        GPU (`--config proxy --codec-steps N --dit-steps M`); it sees far fewer clips than the GPU run."""
        return cls(codec_batch=4, codec_frames=9, dit_batch=4)

    @classmethod
    def small(cls) -> "Config":
        """A 64x64 model a 2-core CPU trains in under an hour: a check of the recipe (what the captions
        teach, which sampler and shift) where no GPU is at hand, not a model to ship."""
        return cls(size=64, codec=dict(widths=(16, 32), latent_width=64, z_dim=16),
                   transformer=dict(TRANSFORMER, num_attention_heads=4, attention_head_dim=32, ffn_dim=512,
                                    num_layers=4),
                   codec_batch=8, codec_frames=9, dit_batch=8)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> "Config":
        obj = dict(obj)
        obj["codec"] = dict(obj["codec"], widths=tuple(obj["codec"]["widths"]))
        obj["transformer"] = dict(obj["transformer"], patch_size=tuple(obj["transformer"]["patch_size"]))
        obj["schedule"] = tuple(obj.get("schedule", SCHEDULE))  # runs from before it was a setting
        obj.setdefault("sigma_uniform", 0.0)
        obj.setdefault("dit_object_weight", 0.0)
        obj.setdefault("dit_outline_weight", 0.0)
        obj.setdefault("dit_sink_weight", 1.0)
        obj.setdefault("dit_twins", 0.0)
        obj.setdefault("dit_rotating", 0.0)
        obj.setdefault("one_way_spin", False)
        obj.setdefault("spin_speed", 0.0)
        obj.setdefault("dit_openings", 0)
        obj.setdefault("opening_sigma_floor", 0.0)
        obj.setdefault("opening_swap", False)
        obj.setdefault("clip_swap", False)
        obj.setdefault("self_context", 0.0)
        obj.setdefault("object_scale", 1.0)
        obj.setdefault("upright", False)
        return cls(**obj)


# -- text -------------------------------------------------------------------------------------------------
def build_tokenizer(text_len: int):
    """Word-level tokenizer: the caption vocabulary first, then the embedded default's words."""
    from ..engine.default import WORDS, word_tokenizer

    return word_tokenizer([*data.vocabulary(), *WORDS], text_len)


def encode_text(tokenizer, text_encoder, captions: list[str], text_len: int, device) -> torch.Tensor:
    """As the engine's PromptEncoder: pad to text_len, encode with the mask, zero what follows the prompt."""
    batch = tokenizer(captions, padding="max_length", max_length=text_len, truncation=True,
                      return_attention_mask=True, return_tensors="pt")
    ids, mask = data.upload(batch["input_ids"], device), data.upload(batch["attention_mask"], device)
    hidden = text_encoder(ids, attention_mask=mask).last_hidden_state
    return hidden * mask.unsqueeze(-1).to(hidden.dtype)


# -- block-causal teacher forcing -------------------------------------------------------------------------
def teacher_forcing_mask(frames: int, chunk: int, sink: int, window: int) -> torch.Tensor:
    """[2F, 2F] frame-level mask over (clean frames, noised frames): True where a query may attend."""
    idx = torch.arange(frames)
    c = idx // chunk
    end = (c + 1) * chunk
    start = c * chunk
    g = idx.view(1, -1)
    in_window = (g < sink) | (g >= (end - window).view(-1, 1))
    clean_clean = (g < end.view(-1, 1)) & in_window
    noised_clean = (g < start.view(-1, 1)) & in_window
    noised_noised = c.view(-1, 1) == c.view(1, -1)
    top = torch.cat([clean_clean, torch.zeros(frames, frames, dtype=torch.bool)], dim=1)
    bottom = torch.cat([noised_clean, noised_noised], dim=1)
    return torch.cat([top, bottom], dim=0)


class _MaskedSelfAttention:
    """diffusers' Wan attention with the block-causal mask on self-attention (cross-attention unmasked)."""

    def __init__(self):
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        self.inner = WanAttnProcessor()
        self.mask: torch.Tensor | None = None  # the mask of the forward in progress (None: attend everywhere)
        self.masks: dict = {}  # (context, frames, tokens a frame, chunk, sink, window, device) -> mask, built once each
        self.rope: dict = {}  # (context, frames, gap, grid, device, dtype) -> the cos/sin tables, built once each

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        mask = self.mask if encoder_hidden_states is None else None
        return self.inner(attn, hidden_states, encoder_hidden_states, mask, rotary_emb)


def frame_positions(frames: int, sink: int, gap: int) -> list[tuple[int, int]]:
    """(first absolute frame, frames) runs: the sink at 0, the rest `gap` frames later."""
    runs = [(0, min(sink, frames))]
    if frames > sink:
        runs.append((sink + gap, frames - sink))
    return runs


def teacher_forcing_forward(model, processor: _MaskedSelfAttention, clean, noised, sigmas_per_frame, text,
                            cfg: Config, gap: int) -> torch.Tensor:
    """Velocity for the noised frames [B, C, F, h, w], given the clean frames as block-causal context; with
    clean None, each noised chunk sees only itself, as a stream's first chunk does (an opening)."""
    context = clean is not None
    b, _, frames, h, w = noised.shape
    pt, ph, pw = model.config.patch_size
    grid_h, grid_w = h // ph, w // pw
    tpf = grid_h * grid_w
    head_dim = model.config.attention_head_dim
    dev = noised.device
    rope_dtype = torch.float64 if noised.dtype == torch.float64 else torch.float32
    rope_key = (context, frames, gap, grid_h, grid_w, head_dim, cfg.sink, dev, rope_dtype)
    if rope_key not in processor.rope:  # a few hundred gaps at most: each table built and uploaded once
        cos, sin = zip(*(rope_tables(TokenGrid(n, grid_h, grid_w), first, head_dim)
                         for first, n in frame_positions(frames, cfg.sink, gap)))
        cos, sin = torch.cat(cos, dim=1).to(rope_dtype), torch.cat(sin, dim=1).to(rope_dtype)
        copies = 2 if context else 1  # the clean frames sit where their noised twins do
        processor.rope[rope_key] = (data.upload(torch.cat([cos] * copies, dim=1), dev),
                                    data.upload(torch.cat([sin] * copies, dim=1), dev))
    rope = processor.rope[rope_key]
    key = (context, frames, tpf, cfg.chunk, cfg.sink, cfg.window, dev)
    if key not in processor.masks:  # the same every step: built once, kept on the device
        mask = teacher_forcing_mask(frames, cfg.chunk, cfg.sink, cfg.window)
        if not context:
            mask = mask[frames:, frames:]  # the noised chunks, each on its own
        # One chunk alone attends everywhere: no mask, so attention runs its fastest kernel.
        processor.masks[key] = None if bool(mask.all()) else \
            mask.repeat_interleave(tpf, 0).repeat_interleave(tpf, 1).to(dev)
    processor.mask = processor.masks[key]

    seq = torch.cat([clean, noised], dim=2) if context else noised
    x = model.patch_embedding(seq.to(model.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
    t_frames = sigmas_per_frame * 1000.0  # [B, F], then the clean frames at t = 0 before them: [B, 2F]
    if context:
        t_frames = torch.cat([torch.zeros_like(t_frames), t_frames], dim=1)
    n = t_frames.shape[1] * tpf
    timestep = t_frames.repeat_interleave(tpf, dim=1)
    temb, tproj, enc, _ = model.condition_embedder(timestep.flatten(), text.to(x.dtype), None, timestep_seq_len=n)
    tproj = tproj.unflatten(2, (6, -1))
    for blk in model.blocks:
        x = blk(x, enc, tproj, rope)
    shift, scale = (model.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)
    x = (model.norm_out(x.float()) * (1 + scale.squeeze(2)) + shift.squeeze(2)).type_as(x)
    x = model.proj_out(x)[:, n - frames * tpf:]
    x = x.reshape(b, frames, grid_h, grid_w, pt, ph, pw, -1)
    return x.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)


# -- the trainer -----------------------------------------------------------------------------------------
def _rng_to_str(state: torch.Tensor) -> str:
    return base64.b64encode(state.cpu().numpy().tobytes()).decode()


def _rng_from_str(text: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.uint8).copy())


def object_distance(video: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, H, W]: each pixel's RGB distance from its frame's median colour. Backgrounds are shades of one
    colour near the median; objects (a few percent of a frame) are far from it."""
    median = video.flatten(3).median(dim=3).values[..., None, None]  # [B, 3, T, 1, 1]
    return (video - median).pow(2).sum(dim=1, keepdim=True).sqrt()


def latent_object_weight(video: torch.Tensor, weight: float, outline: torch.Tensor | None = None,
                         outline_weight: float = 0.0) -> torch.Tensor:
    """[B, 1, S, H/8, W/8] loss weights on the codec's latent grid: 1 + weight x the largest object distance of
    the video pixels a latent pixel encodes (its first frame alone, then 4 frames each) + outline_weight x the
    largest of their `outline` [B, 1, T, H, W] values, with a mean of 1."""
    w = 1.0 + weight * latent_max(object_distance(video))
    if outline is not None and outline_weight:
        w = w + outline_weight * latent_max(outline)
    return w / w.mean(dim=(1, 2, 3, 4), keepdim=True)


def sink_weighted(weight: torch.Tensor, sink: int, factor: float) -> torch.Tensor:
    """Loss weights [B, 1, S, h, w] (or [B, 1, S, 1, 1]) with the first `sink` latent frames times `factor`,
    scaled back to a mean of 1 per clip."""
    frames = torch.ones(weight.shape[2], dtype=weight.dtype, device=weight.device)
    frames[:sink] = factor
    w = weight * frames.view(1, 1, -1, 1, 1)
    return w / w.mean(dim=(1, 2, 3, 4), keepdim=True)


class SpecPrefetch:
    """Draws the next DiT steps' clip specs (data.step_specs) in a worker process while this one queues the GPU
    work of the current step. A step of 16 full clips and 256 openings spends about 30 ms of the host's time
    drawing specs in Python, time in which the host queues no GPU work, and the compiled step is bound by the
    host (BENCHMARKS: "Compiled DiT blocks for training"). A step the worker has not finished is drawn here
    instead, so the worker never holds the loop up (its start, importing torch, takes seconds)."""

    AHEAD = 3  # steps drawn ahead, per kind of batch

    def __init__(self):
        import concurrent.futures
        import multiprocessing

        # spawn, not fork: a fork of a process that holds a CUDA context is not safe
        self.pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        self.jobs: dict = {}  # (kind, step) -> future
        self.drawn_ahead = 0  # steps whose specs came from the worker (tests, progress)

    def take(self, key: tuple, args_of) -> list:
        """The specs of `key` = (kind, step), args_of(step) being data.step_specs' arguments for a step of this
        kind; the next AHEAD steps of the kind are queued on the worker."""
        kind, step = key
        for old in [k for k in self.jobs if k[0] == kind and k[1] < step]:  # a jump (resume): never wanted
            self.jobs.pop(old).cancel()
        for ahead in range(step + 1, step + 1 + self.AHEAD):
            if (kind, ahead) not in self.jobs:
                self.jobs[(kind, ahead)] = self.pool.submit(data.step_specs, *args_of(ahead))
        job = self.jobs.pop(key, None)
        if job is not None and job.done() and job.exception() is None:
            self.drawn_ahead += 1
            return job.result()
        if job is not None:
            job.cancel()
        return data.step_specs(*args_of(step))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.jobs.clear()


class Trainer:
    STAGES = ("codec", "dit", "done")

    def __init__(self, out: str | Path, config: Config, device="cpu", progress=None, compile: bool | str = False,
                 prefetch: bool = False):
        from diffusers import WanTransformer3DModel
        from transformers import UMT5Config, UMT5EncoderModel

        self.out = Path(out)
        self.cfg = config
        self.device = torch.device(device)
        self.progress = progress or Progress()
        self.tokenizer = build_tokenizer(config.text_len)
        saved = torch.random.get_rng_state()
        try:
            torch.manual_seed(config.seed)
            self.codec = Codec(**config.codec).to(self.device)
            self.transformer = WanTransformer3DModel(**config.transformer).to(self.device)
            self.text_encoder = UMT5EncoderModel(
                UMT5Config(vocab_size=len(self.tokenizer), **config.text_encoder)).to(self.device)
        finally:
            torch.random.set_rng_state(saved)
        self.processor = _MaskedSelfAttention()
        for blk in self.transformer.blocks:
            blk.attn1.set_processor(self.processor)
        if compile:
            self._compile_modules(None if compile is True else compile)
        self.prefetch = SpecPrefetch() if prefetch else None  # closed at the end of run
        self.ema = {k: v.detach().clone() for k, v in self._dit_params().items()}
        fused = self.device.type == "cuda"  # one kernel per step for all parameters, rather than a few per tensor
        self.codec_opt = torch.optim.AdamW(self.codec.parameters(), lr=config.codec_lr, weight_decay=0.0, fused=fused)
        self.dit_opt = torch.optim.AdamW(list(self.transformer.parameters()) + list(self.text_encoder.parameters()),
                                         lr=config.dit_lr, weight_decay=config.weight_decay, betas=(0.9, 0.99),
                                         fused=fused)
        self.generator = torch.Generator(self.device).manual_seed(config.seed + 1)
        self.stage = "codec"
        self.steps = {"codec": 0, "dit": 0}
        self.elapsed = {"codec": 0.0, "dit": 0.0}
        self.dit_since = 0  # the DiT step its learning-rate warm-up counts from (take_model: where it went on)
        self._dit_left = lambda: 1.0  # the share of the DiT's budget still ahead; `run` knows the budget
        self.losses: list[float] = []
        self._previous: str | None = None  # the checkpoint before the newest, kept as a fallback
        self.sigmas = torch.tensor([warp(t, config.shift) for t in config.schedule], device=self.device)
        self.autocast = self.device.type == "cuda"

    COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")

    def _compile_modules(self, mode: str | None = None) -> None:
        """torch.compile each DiT block, the DiT's condition embedder and the text encoder in place (parameter
        names unchanged, so checkpoints and exports are the same): at width 192 a block's time goes to its many
        small elementwise kernels (modulation, float32 norms, rotary), which inductor fuses. The step is bound
        by the host's kernel launches (4,715 a step with the blocks alone compiled on the H200, the GPU busy 57%
        of it: BENCHMARKS, "Where a training step's host time goes"), and the text encoder (two umT5 layers, each
        computing its own relative position bias, run for both batches with their gradients) and the condition
        embedder (sinusoids and three small MLPs) ran eagerly, op by op. The same math: a compiled run resumes
        an uncompiled one and back. `mode` is torch.compile's. Not "reduce-overhead": the blocks share one
        compiled graph, and with CUDA graphs each block's replay overwrites the output of the block before it
        while the step still needs it (torch raised "accessing tensor output of CUDAGraphs that has been
        overwritten by a subsequent run" on the H200, 2026-12-03, at the first step)."""
        if mode == "reduce-overhead":
            raise UserError("--compile reduce-overhead: its CUDA graphs fail in training (the DiT's blocks share "
                            "one graph, whose replays overwrite each other's outputs before the backward pass "
                            f"reads them); use one of {', '.join(self.COMPILE_MODES)}")
        if mode is not None and mode not in self.COMPILE_MODES:
            raise UserError(f"--compile {mode}: expected one of {', '.join(self.COMPILE_MODES)}")
        import torch._dynamo

        # One graph per kind of forward (full clips with their mask, openings unmasked, the no-grad context
        # pass), shared by the blocks; the limit leaves room should a torch version specialise per block.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for module in [*self.transformer.blocks, self.transformer.condition_embedder, self.text_encoder]:
            module.compile(dynamic=False, mode=mode)
        self.progress(f"DiT blocks, condition embedder and text encoder compiled (torch.compile, mode "
                      f"{mode or 'default'}; the first steps of each kind of forward build them)")

    # -- batches: a function of (seed, stage, step) only --------------------------------------------------
    def _seed_base(self, stage: int, step: int, count: int) -> int:
        """The seed of a step's first clip: each stage's clips, step by step, come from seeds of their own."""
        return (self.cfg.seed * 1_000_003 + stage) * 2**40 + step * count

    def _specs(self, stage: int, step: int, count: int):
        base = self._seed_base(stage, step, count)
        return [data.sample(base + j, self.cfg.object_scale, self.cfg.upright) for j in range(count)]

    def _step_args(self, stage: int, twin_stage: int, step: int, count: int) -> tuple:
        """data.step_specs' arguments for a DiT step's clips (stage 2: its full clips, 4: its openings)."""
        cfg = self.cfg
        return (self._seed_base(stage, step, count), count, cfg.object_scale, cfg.upright, self.twin_pairs(count),
                [cfg.seed, twin_stage, step], cfg.dit_rotating, cfg.one_way_spin, cfg.spin_speed)

    def _step_specs(self, stage: int, twin_stage: int, step: int, count: int) -> list:
        """A DiT step's clip specs, twin pairs leading; drawn ahead by the prefetching worker when one runs
        (the same specs: data.step_specs is a pure function of its arguments)."""
        if self.prefetch is None:
            return data.step_specs(*self._step_args(stage, twin_stage, step, count))
        return self.prefetch.take((stage, step), lambda s: self._step_args(stage, twin_stage, s, count))

    def codec_batch(self, step: int) -> torch.Tensor:
        specs = self._specs(1, step, self.cfg.codec_batch)
        start = float(np.random.default_rng([self.cfg.seed, 1, step]).uniform(0.0, 30.0))
        return data.render(specs, data.clip_times(self.cfg.codec_frames, start, self.device), self.cfg.size,
                           self.device)

    def dit_batch(self, step: int):
        """(clean latents [B, 16, S, h, w], captions, gap, loss weights [B, 1, S, h, w] or None): a step's clips
        through the frozen codec."""
        cfg = self.cfg
        specs = self._step_specs(2, 3, step, cfg.dit_batch)
        rng = np.random.default_rng([cfg.seed, 2, step])
        gap = int(rng.integers(1, cfg.max_gap // cfg.chunk + 1)) * cfg.chunk if rng.random() < cfg.gap_prob else 0
        n = 1 + TEMPORAL * (cfg.latent_frames - 1)
        frames = torch.arange(n, dtype=torch.float32, device=self.device)
        sink_end = 1 + TEMPORAL * (cfg.sink - 1)  # video frames of the sink's latent frames
        times = torch.where(frames < sink_end, frames, frames + TEMPORAL * gap) / data.FPS
        latents, weight = self._encoded(specs, times)
        if cfg.dit_sink_weight != 1.0:
            ones = torch.ones(latents.shape[0], 1, latents.shape[2], 1, 1, device=self.device)
            weight = sink_weighted(ones if weight is None else weight, cfg.sink, cfg.dit_sink_weight)
        return latents, [s.caption for s in specs], gap, weight

    def opening_batch(self, step: int):
        """(clean latents [N, 16, chunk, h, w], captions, loss weights [N, 1, chunk, h, w] or None): the step's
        dit_openings openings, each another clip's first chunk, through the frozen codec."""
        cfg = self.cfg
        specs = self._step_specs(4, 5, step, cfg.dit_openings)
        times = data.clip_times(1 + TEMPORAL * (cfg.chunk - 1), 0.0, self.device)
        latents, weight = self._encoded(specs, times)
        return latents, [s.caption for s in specs], weight

    def _encoded(self, specs: list, times: torch.Tensor):
        """(latents [B, 16, S, h, w], loss weights [B, 1, S, h, w] or None) of the specs rendered at `times`."""
        cfg = self.cfg
        video = data.render(specs, times, cfg.size, self.device)
        with torch.no_grad(), self._autocast():
            latents = self.codec.encode(video).float()
        outline = data.outline(specs, times, cfg.size, self.device) if cfg.dit_outline_weight else None
        weight = (latent_object_weight(video, cfg.dit_object_weight, outline, cfg.dit_outline_weight)
                  if cfg.dit_object_weight or cfg.dit_outline_weight else None)
        return latents, weight

    def twin_pairs(self, batch: int) -> int:
        """How many twin pairs lead a batch of this many clips: clips 2k and 2k + 1 for k below it."""
        return int(self.cfg.dit_twins * batch) // 2

    @staticmethod
    def _twinned(t: torch.Tensor, pairs: int) -> torch.Tensor:
        """t [N, ...] (the batch's first N clips) with each twin pair's second clip given its first clip's values
        (noise, sigmas)."""
        if not pairs:
            return t
        index = torch.arange(t.shape[0], device=t.device)
        index[1:2 * pairs:2] -= 1
        return t[index]

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast)

    def _lr_scale(self, step: int) -> float:
        return min(1.0, (step + 1) / max(1, self.cfg.warmup))

    def _cooldown_scale(self) -> float:
        """1 until the last `dit_cooldown` of the DiT's budget, then falling linearly to 0 at its end."""
        if not self.cfg.dit_cooldown:
            return 1.0
        return max(0.0, min(1.0, self._dit_left() / self.cfg.dit_cooldown))

    # -- one step of each stage ---------------------------------------------------------------------------
    def codec_loss(self, video: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            z = self.codec.encode_raw(video)
            noisy = z + self.cfg.codec_noise * torch.randn(z.shape, generator=self.generator, device=z.device)
            recon, _ = self.codec.decode_raw(noisy)
        recon = recon.float()
        err = (recon - video).pow(2) + 0.5 * (recon - video).abs()
        if self.cfg.codec_object_weight:
            err = err * (1 + self.cfg.codec_object_weight * object_distance(video))
        return err.mean() + 1e-4 * z.float().pow(2).mean()

    def chunk_sigmas(self, batch: int, frames: int) -> torch.Tensor:
        """[B, F]: one sigma per chunk of cfg.chunk frames, from the schedule or (sigma_uniform of them) uniform."""
        cfg = self.cfg
        chunks = math.ceil(frames / cfg.chunk)
        pick = torch.randint(0, len(self.sigmas), (batch, chunks), generator=self.generator, device=self.device)
        sigma = self.sigmas[pick]
        if cfg.sigma_uniform:
            uniform = torch.rand((batch, chunks), generator=self.generator, device=self.device) < cfg.sigma_uniform
            drawn = 1.0 - torch.rand((batch, chunks), generator=self.generator, device=self.device)  # (0, 1]
            sigma = torch.where(uniform, drawn, sigma)
        return sigma.repeat_interleave(cfg.chunk, dim=1)[:, :frames]

    def own_context(self, latents: torch.Tensor, text: torch.Tensor, gap: int) -> torch.Tensor:
        """The clean context of a step: the first round(self_context x B) clips get the model's own x0
        prediction from the schedule's last sigma (each chunk predicted with the real earlier chunks as its
        context, no gradient), the rest their real latents. A fixed count keeps shapes static (no host sync)."""
        own, pairs = round(self.cfg.self_context * latents.shape[0]), self.twin_pairs(latents.shape[0])
        if own < 2 * pairs:
            own -= own % 2  # both clips of a twin pair, or neither
        if own == 0:
            return latents
        real = latents[:own]
        s = self.sigmas[-1]
        noise = torch.randn(real.shape, generator=self.generator, device=self.device, dtype=real.dtype)
        noise = self._twinned(noise, pairs)
        noised = (1 - s) * real + s * noise
        with torch.no_grad():
            v = teacher_forcing_forward(self.transformer, self.processor, real, noised,
                                        s.expand(own, real.shape[2]), text[:own].detach(), self.cfg, gap)
            predicted = (noised - s * v.to(noised.dtype)).to(latents.dtype)  # bf16 under autocast: widen
        return torch.cat([predicted, latents[own:]])

    def _noised(self, latents: torch.Tensor, floor: float = 0.0):
        """(noised latents, noise, sigmas [B, F]): each chunk at its own sigma, twin pairs sharing both; with a
        floor, one sigma a clip, uniform in [floor, 1]."""
        b, _, frames = latents.shape[:3]
        pairs = self.twin_pairs(b)
        if floor:
            drawn = 1.0 - torch.rand((b, 1), generator=self.generator, device=self.device)  # (0, 1]
            sigma = self._twinned((floor + (1.0 - floor) * drawn).expand(b, frames), pairs)
        else:
            sigma = self._twinned(self.chunk_sigmas(b, frames), pairs)
        noise = self._twinned(torch.randn(latents.shape, generator=self.generator, device=self.device), pairs)
        s = sigma.view(b, 1, frames, 1, 1)
        return (1 - s) * latents + s * noise, noise, sigma

    @staticmethod
    def _flow_error(v, noise, latents, weight) -> torch.Tensor:
        err = (v.to(latents.dtype) - (noise - latents)).pow(2)  # bf16 under autocast: widen
        return err.mean() if weight is None else (err * weight).mean()

    def dit_loss(self, latents: torch.Tensor, captions: list[str], gap: int,
                 weight: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.cfg
        noised, noise, sigma = self._noised(latents)
        if cfg.clip_swap:
            noised, noise = self._swapped(latents, noised, noise, sigma)
        with self._autocast():
            text = encode_text(self.tokenizer, self.text_encoder, captions, cfg.text_len, self.device)
            context = self.own_context(latents, text, gap)
            v = teacher_forcing_forward(self.transformer, self.processor, context, noised, sigma, text, cfg, gap)
        return self._flow_error(v, noise, latents, weight)

    def opening_loss(self, latents: torch.Tensor, captions: list[str],
                     weight: torch.Tensor | None = None) -> torch.Tensor:
        """The flow-matching loss of openings: first chunks drawn from their words alone, no context."""
        cfg = self.cfg
        noised, noise, sigma = self._noised(latents, cfg.opening_sigma_floor)
        if cfg.opening_swap:
            noised, noise = self._swapped(latents, noised, noise, sigma)
        with self._autocast():
            text = encode_text(self.tokenizer, self.text_encoder, captions, cfg.text_len, self.device)
            v = teacher_forcing_forward(self.transformer, self.processor, None, noised, sigma, text, cfg, 0)
        return self._flow_error(v, noise, latents, weight)

    def _swapped(self, latents, noised, noise, sigma):
        """(noised, noise) with each twin pair's noised latents exchanged where the pair's sigma is at least
        SWAP_MIN_SIGMA, and the noise that then takes each clip's input to its own latents: input = (1 - s) x0 +
        s noise, so the velocity target noise - x0 leads from the twin's outline to the clip's."""
        pairs = self.twin_pairs(latents.shape[0])
        if not pairs:
            return noised, noise
        clips = torch.arange(latents.shape[0], device=latents.device)
        twin = clips.clone()
        twin[0:2 * pairs:2] += 1
        twin[1:2 * pairs:2] -= 1
        s = sigma.view(sigma.shape[0], 1, sigma.shape[1], 1, 1)
        swap = (s >= SWAP_MIN_SIGMA) & (clips < 2 * pairs).view(-1, 1, 1, 1, 1)
        given = torch.where(swap, noised[twin], noised)
        return given, (given - (1 - s) * latents) / s

    def _step(self, loss, opt, params, step, base_lr):
        for g in opt.param_groups:
            g["lr"] = base_lr * self._lr_scale(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        opt.step()

    def train_codec_step(self, video: torch.Tensor | None = None) -> float:
        return float(self._codec_step(video))

    def train_dit_step(self, batch=None) -> float:
        return float(self._dit_step(batch))

    # The steps proper return the loss as a device tensor: reading it (float) waits for the GPU, and `run`
    # reads them only every log_every steps so the host keeps queueing work ahead of the GPU.
    def _codec_step(self, video: torch.Tensor | None = None) -> torch.Tensor:
        step = self.steps["codec"]
        video = self.codec_batch(step) if video is None else video
        self.codec.train()
        loss = self.codec_loss(video)
        self._step(loss, self.codec_opt, list(self.codec.parameters()), step, self.cfg.codec_lr)
        self.steps["codec"] += 1
        return loss.detach()

    def _dit_step(self, batch=None) -> torch.Tensor:
        step = self.steps["dit"]
        batch = self.dit_batch(step) if batch is None else batch
        self.transformer.train()
        self.text_encoder.train()
        loss = self.dit_loss(*batch)
        if self.cfg.dit_openings:  # every noised latent frame weighs the same, a full clip's or an opening's
            openings = self.opening_batch(step)
            full, opening = batch[0].shape[0] * batch[0].shape[2], openings[0].shape[0] * openings[0].shape[2]
            loss = (loss * full + self.opening_loss(*openings) * opening) / (full + opening)
        params = list(self.transformer.parameters()) + list(self.text_encoder.parameters())
        self._step(loss, self.dit_opt, params, step - self.dit_since, self.cfg.dit_lr * self._cooldown_scale())
        self.steps["dit"] += 1
        with torch.no_grad():
            decay = min(self.cfg.ema, (1 + step) / (10 + step))
            live = self._dit_params()
            torch._foreach_lerp_([self.ema[k] for k in live], [p.detach() for p in live.values()], 1 - decay)
        return loss.detach()

    def _dit_params(self) -> dict:
        named = {f"transformer.{k}": p for k, p in self.transformer.named_parameters()}
        named.update({f"text_encoder.{k}": p for k, p in self.text_encoder.named_parameters()})
        return named

    def stat_videos(self, clips: int = 64):
        """The fixed clips the latent statistics are measured on, 8 at a time."""
        specs = [data.sample(10**12 + self.cfg.seed * 10**6 + j, self.cfg.object_scale, self.cfg.upright)
                 for j in range(clips)]
        for i in range(0, clips, 8):
            yield data.render(specs[i:i + 8], data.clip_times(self.cfg.codec_frames), self.cfg.size, self.device)

    @torch.no_grad()
    def measure_latents(self, clips: int = 64) -> None:
        """Per-channel mean and std of the codec's latents over fixed clips: the DiT's unit scale."""
        self.codec.eval()
        z = torch.cat([self.codec.encode_raw(v).float() for v in self.stat_videos(clips)])
        z = z.transpose(0, 1).flatten(1)
        self.codec.latent_mean.copy_(z.mean(1))
        self.codec.latent_std.copy_(z.std(1).clamp(min=1e-4))

    def take_codec(self, run: str | Path) -> None:
        """Start at the DiT stage with the trained codec (and its latent statistics) of another run of the same
        size and codec config, or of a model folder (the shipped one): DiT settings compared on one codec, or a
        new DiT trained on a codec already trained, without training it again."""
        from safetensors.torch import load_file

        folder = Path(run)
        if (folder / "model_index.json").is_file():
            sketch = json.loads((folder / "model_index.json").read_text()).get("sketch", {})
            try:
                codec = Codec.load(folder / "codec")
            except (OSError, ValueError, KeyError, RuntimeError) as e:
                raise UserError(f"--codec-from {run}: no sketch codec there ({e})") from None
            size, config = list(sketch.get("size", ())), codec.config
            fits = size == [self.cfg.size] * 2
            weights = codec.state_dict
            codec_steps, source = int(sketch.get("steps", {}).get("codec", 0)), folder
        else:
            latest = Trainer.latest(run)
            if latest is None:
                raise UserError(f"--codec-from {run}: no checkpoint or model folder there")
            state = json.loads((latest / "state.json").read_text())
            if state["stage"] == "codec":
                raise UserError(f"--codec-from {run}: its codec is still training (checkpoint {latest.name})")
            other = Config.from_json(state["config"])
            size, config, fits = other.size, other.codec, other.size == self.cfg.size

            def weights():
                tensors = load_file(str(latest / "state.safetensors"))
                return {k[len("codec."):]: v for k, v in tensors.items() if k.startswith("codec.")}

            codec_steps, source = state["steps"]["codec"], latest
        if not fits or config != self.cfg.codec:
            raise UserError(f"--codec-from {run}: a codec of size {size} {config}, this run needs "
                            f"{self.cfg.size} {self.cfg.codec}")
        self.codec.load_state_dict(weights())
        self.codec.eval().requires_grad_(False)
        self.stage, self.steps["codec"] = "dit", codec_steps
        self.progress(f"codec taken from {source} ({codec_steps} steps)")

    def report_codec(self, captions: int = 50) -> dict:
        """How much of the captions survives the codec (the ceiling of the DiT's prompt following)."""
        from .evaluate import prompt_following

        with self._autocast():
            r = prompt_following(None, captions, frames=self.cfg.codec_frames, source="codec", codec=self.codec,
                                 side=self.cfg.size, object_scale=self.cfg.object_scale, upright=self.cfg.upright)
        self.progress(f"the codec keeps the captioned object colour in {r['object_colour']:.0%} and the "
                      f"background colour in {r['background_colour']:.0%} of {captions} held-out clips")
        return r

    def take_model(self, folder: str | Path) -> None:
        """Go on training the DiT of an exported model folder, on its codec: what is left of a run whose GPU
        machine was taken back (tools/device-sketch.sh brings the newest checkpoint's folder back every call).
        The folder holds the EMA weights, which become the live and the EMA weights; the step count and the
        minutes spent go on from the folder's. Adam's moments are not in a folder, so they start afresh and
        the learning rate warms up again, as at a run's start."""
        from diffusers import WanTransformer3DModel
        from transformers import UMT5EncoderModel

        folder = Path(folder)
        if not (folder / "model_index.json").is_file():
            raise UserError(f"--dit-from {folder}: not a model folder (no model_index.json)")
        self.take_codec(folder)
        sketch = json.loads((folder / "model_index.json").read_text()).get("sketch", {})
        mine = {"shift": self.cfg.shift, "sampler": self.cfg.sampler, "schedule": [float(t) for t in self.cfg.schedule],
                "object_scale": self.cfg.object_scale, "upright": self.cfg.upright}
        differ = [f"{k} {sketch.get(k)!r} (this run: {v!r})" for k, v in mine.items() if sketch.get(k) != v]
        if differ:
            raise UserError(f"--dit-from {folder}: trained with other settings: {', '.join(differ)}")
        try:
            transformer = WanTransformer3DModel.from_pretrained(folder / "transformer")
            text_encoder = UMT5EncoderModel.from_pretrained(folder / "text_encoder")
            self.transformer.load_state_dict(transformer.state_dict())
            self.text_encoder.load_state_dict(text_encoder.state_dict())
        except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: another config's shapes
            raise UserError(f"--dit-from {folder}: its DiT does not fit this run's config "
                            f"({str(e).splitlines()[0]})") from None
        for k, p in self._dit_params().items():
            self.ema[k].copy_(p.detach())
        self.steps["dit"] = self.dit_since = int(sketch.get("steps", {}).get("dit", 0))
        self.elapsed.update({k: float(v) for k, v in sketch.get("elapsed", {}).items() if k in self.elapsed})
        self.progress(f"DiT taken from {folder} at step {self.steps['dit']} ({self.elapsed['dit'] / 60:.1f} min "
                      "trained); the optimizer starts afresh")

    # -- checkpoints ----------------------------------------------------------------------------------------
    def _tensors(self) -> dict:
        t = {f"codec.{k}": v for k, v in self.codec.state_dict().items()}
        t.update({f"transformer.{k}": v for k, v in self.transformer.state_dict().items()})
        t.update({f"text_encoder.{k}": v for k, v in self.text_encoder.state_dict().items()})
        t.update({f"ema.{k}": v for k, v in self.ema.items()})
        for name, opt in (("codec_opt", self.codec_opt), ("dit_opt", self.dit_opt)):
            for idx, st in opt.state_dict()["state"].items():
                for key, val in st.items():
                    t[f"{name}.{idx}.{key}"] = val if torch.is_tensor(val) else torch.tensor(val)
        return {k: v.detach().to("cpu").contiguous().clone() for k, v in t.items()}

    def _json_state(self) -> dict:
        return {
            "stage": self.stage, "steps": self.steps, "elapsed": self.elapsed, "losses": self.losses[-1000:],
            "dit_since": self.dit_since,
            "generator": _rng_to_str(self.generator.get_state()),
            "param_groups": {n: o.state_dict()["param_groups"] for n, o in
                             (("codec_opt", self.codec_opt), ("dit_opt", self.dit_opt))},
            "config": self.cfg.to_json(),
        }

    def save_checkpoint(self) -> Path:
        """Write OUT/checkpoints/<stage>-<step>/ then point OUT/checkpoints/latest at it (each move atomic)."""
        from safetensors.torch import save_file

        root = self.out / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        name = f"{self.stage}-{self.steps['codec']:07d}-{self.steps['dit']:07d}"
        tmp = root / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(self._tensors(), str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(self._json_state()))
        final = root / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = root / ".latest.tmp"
        pointer.write_text(name)
        os.replace(pointer, root / "latest")
        for old in root.iterdir():  # keep the newest two
            if old.is_dir() and not old.name.startswith(".") and old.name not in (name, self._previous):
                shutil.rmtree(old, ignore_errors=True)
        self._previous = name
        return final


    @staticmethod
    def latest(out: str | Path) -> Path | None:
        pointer = Path(out) / "checkpoints" / "latest"
        if not pointer.is_file():
            return None
        path = pointer.parent / pointer.read_text().strip()
        return path if (path / "state.json").is_file() else None

    def load_checkpoint(self, path: Path, noise: bool = True) -> None:
        """noise=False leaves the noise generator alone: an export on the CPU of a run trained on a GPU, whose
        generator state is a CUDA one."""
        from safetensors.torch import load_file

        tensors = load_file(str(path / "state.safetensors"))
        state = json.loads((path / "state.json").read_text())

        def part(prefix):
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        self.codec.load_state_dict(part("codec."))
        self.transformer.load_state_dict(part("transformer."))
        self.text_encoder.load_state_dict(part("text_encoder."))
        for k, v in part("ema.").items():
            self.ema[k].copy_(v)
        for name, opt in (("codec_opt", self.codec_opt), ("dit_opt", self.dit_opt)):
            per: dict[int, dict] = {}
            for k, v in part(f"{name}.").items():
                idx, key = k.split(".", 1)
                per.setdefault(int(idx), {})[key] = v.to(self.device) if key != "step" else v
            opt.load_state_dict({"state": per, "param_groups": state["param_groups"][name]})
        if noise:
            self.generator.set_state(_rng_from_str(state["generator"]))
        self.stage, self.steps, self.elapsed = state["stage"], state["steps"], state["elapsed"]
        self.dit_since = int(state.get("dit_since", 0))
        self.losses = list(state["losses"])
        self._previous = path.name

    # -- export -----------------------------------------------------------------------------------------------
    def export(self, folder: str | Path | None = None, weights: str = "ema") -> Path:
        """The model folder: EMA weights of the transformer and text encoder (weights="training": the weights
        the optimizer holds, to see what the EMA's lag costs), the codec, the tokenizer."""
        from diffusers import WanTransformer3DModel
        from transformers import UMT5Config, UMT5EncoderModel

        folder = Path(folder or self.out / "model")
        tmp = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        transformer = WanTransformer3DModel(**self.cfg.transformer)
        text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(self.tokenizer), **self.cfg.text_encoder))
        if weights not in EXPORT_WEIGHTS:
            raise ValueError(f"weights {weights!r}: one of {', '.join(EXPORT_WEIGHTS)}")
        source = self.ema if weights == "ema" else self._dit_params()
        state = {k: v.detach().float().cpu() for k, v in source.items()}
        transformer.load_state_dict({k[len("transformer."):]: v for k, v in state.items()
                                     if k.startswith("transformer.")}, strict=True)
        missing, unexpected = text_encoder.load_state_dict(
            {k[len("text_encoder."):]: v for k, v in state.items() if k.startswith("text_encoder.")}, strict=False)
        if unexpected or set(missing) - {"encoder.embed_tokens.weight"}:  # tied to `shared`, not a parameter
            raise RuntimeError(f"text encoder weights do not match: missing {missing}, unexpected {unexpected}")
        text_encoder.tie_weights()
        transformer.save_pretrained(tmp / "transformer")
        text_encoder.save_pretrained(tmp / "text_encoder")
        if self.cfg.export_dtype != "float32":
            for part in ("transformer", "text_encoder"):
                _store_as(tmp / part, getattr(torch, self.cfg.export_dtype))
        self.tokenizer.save_pretrained(tmp / "tokenizer")
        self.codec.save(tmp / "codec")
        (tmp / "model_index.json").write_text(json.dumps({
            "_class_name": "WanPipeline", "_diffusers_version": "0.42.1",
            "transformer": ["diffusers", "WanTransformer3DModel"],
            "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
            "codec": ["instrument.sketch.codec", "Codec"],
            "sketch": {"size": [self.cfg.size, self.cfg.size], "fps": data.FPS, "chunk": self.cfg.chunk,
                       "sink": self.cfg.sink, "window": self.cfg.window, "text_len": self.cfg.text_len,
                       "shift": self.cfg.shift, "sampler": self.cfg.sampler,
                       "schedule": list(self.cfg.schedule), "object_scale": self.cfg.object_scale,
                       "upright": self.cfg.upright, "one_way_spin": self.cfg.one_way_spin,
                       "spin_speed": self.cfg.spin_speed, "weights": weights,
                       # milliseconds: a run of a few tiny steps (the tests') still records that it took time
                       "steps": self.steps, "elapsed": {k: round(v, 3) for k, v in self.elapsed.items()}},
        }, indent=1))
        total = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        self.progress(f"model written to {folder} ({total / 1e6:.1f} MB)")
        return folder

    # -- the loop ------------------------------------------------------------------------------------------------
    def run(self, minutes: float | None, codec_steps: int | None = None, dit_steps: int | None = None,
            checkpoint_every: int = 500, log_every: int = 50, stop=lambda: False) -> None:
        cfg = self.cfg
        budget = None if minutes is None else minutes * 60.0
        codec_budget = None if budget is None else budget * cfg.codec_fraction

        def stage_done(name):
            if name == "codec":
                if codec_steps is not None:
                    return self.steps["codec"] >= codec_steps
                return codec_budget is not None and self.elapsed["codec"] >= codec_budget
            if dit_steps is not None:
                return self.steps["dit"] >= dit_steps
            return budget is not None and self.elapsed["codec"] + self.elapsed["dit"] >= budget

        def dit_left():  # the share of the DiT's budget still ahead
            if dit_steps is not None:
                return 1.0 - self.steps["dit"] / max(1, dit_steps)
            if budget is None:
                return 1.0
            span = budget - self.elapsed["codec"]
            return (span - self.elapsed["dit"]) / max(span, 1e-9)

        self._dit_left = dit_left
        if self.stage == "done" and not stage_done("dit"):
            self.stage = "dit"  # a larger budget on resume: carry on
        pending: list[tuple[str, int, torch.Tensor]] = []  # losses not read back from the device yet
        # The logged rate is this call's: a resumed or --dit-from part may run on another machine than the steps
        # before it, and the whole run's average would hide that (a CPU part logged 6.5 steps/s, the GPU's).
        begun = {k: (self.steps[k], self.elapsed[k]) for k in ("codec", "dit")}

        def read_losses():
            if not pending:
                return
            values = torch.stack([loss for _, _, loss in pending]).float().tolist()
            for (name, step, _), value in zip(pending, values):
                if not math.isfinite(value):
                    raise RuntimeError(f"{name} loss went non-finite at step {step}; resume from the last "
                                       "checkpoint with a lower learning rate")
            self.losses.extend(values)
            pending.clear()

        try:
            while self.stage != "done" and not stop():
                name = self.stage
                if stage_done(name):
                    read_losses()
                    if name == "codec":
                        self.measure_latents()
                        self.codec.eval().requires_grad_(False)
                        self.progress(f"codec done after {self.steps['codec']} steps; latent std "
                                      f"{self.codec.latent_std.mean().item():.3f} (mean over channels)")
                        self.report_codec()
                    self.stage = "dit" if name == "codec" else "done"
                    self.save_checkpoint()
                    continue
                if name == "dit":
                    self.codec.eval().requires_grad_(False)
                t0 = time.perf_counter()
                loss = self._codec_step() if name == "codec" else self._dit_step()
                step = self.steps[name]
                pending.append((name, step, loss))
                if step % log_every == 0:  # the host waits for the GPU here only, so the time is the GPU's
                    read_losses()
                self.elapsed[name] += time.perf_counter() - t0
                if step % log_every == 0:
                    recent = self.losses[-log_every:]
                    total = self.elapsed["codec"] + self.elapsed["dit"]
                    self.progress(f"{name} step {step} loss {sum(recent) / len(recent):.5f} "
                                  f"({(step - begun[name][0]) / max(self.elapsed[name] - begun[name][1], 1e-9):.2f}"
                                  " steps/s, "
                                  f"{total / 60:.1f} of {'-' if minutes is None else f'{minutes:g}'} min)")
                if checkpoint_every and step % checkpoint_every == 0:
                    read_losses()
                    self.save_checkpoint()
        finally:
            if self.prefetch is not None:
                self.progress(f"clip specs drawn ahead by the worker for {self.prefetch.drawn_ahead} batches")
                self.prefetch.close()
                self.prefetch = None
        read_losses()
        self.save_checkpoint()


def dit_step_count(text: str) -> tuple[bool, int]:
    """--dit-steps N (the run's total) or +N (a late phase's own steps, which a --dit-from part would otherwise
    have to add to its model's count by hand): (relative, N)."""
    m = re.fullmatch(r"\s*(\+?)(\d+)\s*", text)
    if m is None:
        raise argparse.ArgumentTypeError(f"{text!r}: give a step count N, or +N for N more than the run starts from")
    return m.group(1) == "+", int(m.group(2))


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="run folder: checkpoints/ and model/ go here")
    parser.add_argument("--minutes", type=float, default=None,
                        help="training time over all runs of this folder (codec gets codec_fraction of it)")
    parser.add_argument("--codec-steps", type=int, default=None, help="codec steps instead of a time budget")
    parser.add_argument("--dit-steps", type=dit_step_count, default=None, metavar="N|+N",
                        help="DiT steps instead of a time budget; +N: N more than the run starts from (its "
                             "--resume checkpoint's or its --dit-from model's steps)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/latest")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", nargs="?", const=True, default=False, metavar="MODE",
                        help="torch.compile the DiT blocks, optionally in this torch.compile mode (default or "
                             "max-autotune-no-cudagraphs): faster steps on a GPU, the same model "
                             "(a setting of this call, not of the run: a resumed run may take it or leave it)")
    parser.add_argument("--config", choices=("default", "proxy", "small", "tiny"), default="default",
                        help="proxy: the shipped model with CPU-sized batches; small: a 64x64 model a CPU trains "
                             "in under an hour; tiny: a seconds-long CPU smoke run")
    parser.add_argument("--shift", type=float, default=None,
                        help=f"a new run's sigmas: the engine's 4 timesteps warped with this shift (default {SHIFT:g})")
    parser.add_argument("--schedule", default=None, metavar="T1,T2,...",
                        help="a new run's timesteps (0..1000, one per engine step, decreasing; default "
                             f"{','.join(f'{t:g}' for t in SCHEDULE)}), warped with --shift")
    parser.add_argument("--sampler", choices=("ddim", "renoise"), default=None,
                        help="how the engine samples a new run's model (default ddim)")
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--codec-from", default=None, metavar="RUN",
                        help="a new run starts at the DiT stage with the trained codec of RUN, a run folder or a model "
                        "folder such as the shipped instrument/sketch/model (same size and codec)")
    parser.add_argument("--dit-from", default=None, metavar="MODEL",
                        help="a new run goes on training the DiT of an exported model folder, on its codec, from its "
                             "step and minutes (a run whose GPU machine was lost: its newest exported checkpoint); "
                             "give the lost run's settings again")
    parser.add_argument("--dit-object-weight", type=float, default=None,
                        help="a new run's DiT loss weight on latent pixels that encode objects (default 4)")
    parser.add_argument("--dit-outline-weight", type=float, default=None,
                        help="a new run's extra DiT loss weight where the object's shape differs from the average "
                             "shape at its pose (default 0)")
    parser.add_argument("--dit-twins", type=float, default=None, metavar="F",
                        help="a new run's share of each DiT batch made of twin pairs: clips that differ only in "
                             "their first group's shape, with the same noise (default 0)")
    parser.add_argument("--dit-rotating", type=float, default=None, metavar="F",
                        help="a new run's share of DiT clips made to rotate in place, their caption saying so "
                             "(default 0)")
    parser.add_argument("--one-way-spin", action="store_true",
                        help="a new run's rotating objects (DiT clips) all turn clockwise, so that \"rotating\" "
                             "names one motion (default: either way, at random), written to model_index.json")
    parser.add_argument("--spin-speed", type=float, default=None, metavar="RAD_S",
                        help="a new run's rotating objects (DiT clips) all turn at this many radians a second "
                             "(default: 1 to 2.5, at random), written to model_index.json")
    parser.add_argument("--dit-sink-weight", type=float, default=None,
                        help="a new run's DiT loss weight on the first chunk, drawn from the words alone, against a "
                             "later chunk's (default 1)")
    parser.add_argument("--dit-batch", type=int, default=None,
                        help="a new run's clips per DiT step (default 32; tools/sketch-step-times.py says what a "
                             "GPU takes at no extra time per step)")
    parser.add_argument("--dit-openings", type=int, default=None, metavar="N",
                        help="a new run's openings per DiT step besides --dit-batch: other clips' first chunk "
                             "alone, drawn from the words alone as a stream's first chunk is (default 0)")
    parser.add_argument("--opening-sigma-floor", type=float, default=None, metavar="S",
                        help="a new run's openings are noised to a sigma uniform in [S, 1], where only the words "
                             "tell the outline (default 0: as full clips are)")
    parser.add_argument("--opening-swap", action="store_true",
                        help="a new run noises each twin-pair opening from its twin's latents (the same pose, another "
                             "shape), so that only the shape word tells the outline (needs --dit-twins)")
    parser.add_argument("--clip-swap", action="store_true",
                        help="a new run does the same to the full clips' noised chunks, each twin keeping its own "
                             "clean context, so that later chunks too draw the outline the words and context tell "
                             "(needs --dit-twins)")
    parser.add_argument("--codec-batch", type=int, default=None, help="a new run's clips per codec step (default 16)")
    parser.add_argument("--dit-patch", type=int, choices=(1, 2, 4), default=None,
                        help="a new run's DiT patch in latent pixels, height and width (default 2: 8x8 tokens a "
                             "128x128 frame; 1: 16x16, more tokens to draw an outline with)")
    parser.add_argument("--dit-layers", type=int, default=None,
                        help=f"a new run's DiT layers (default {TRANSFORMER['num_layers']}; half of them with "
                             "--dit-patch 1 keeps 24 FPS on a 2-core CPU)")
    parser.add_argument("--dit-heads", type=int, default=None,
                        help=f"a new run's DiT attention heads (default {TRANSFORMER['num_attention_heads']}; the "
                             "width is heads x head dim)")
    parser.add_argument("--dit-head-dim", type=int, default=None,
                        help=f"a new run's DiT head dimension, even (default {TRANSFORMER['attention_head_dim']}; "
                             "a third of it carries each spatial axis' rotary position)")
    parser.add_argument("--dit-ffn", type=int, default=None,
                        help=f"a new run's DiT feed-forward width (default {TRANSFORMER['ffn_dim']})")
    parser.add_argument("--dit-lr", type=float, default=None,
                        help="a new run's DiT learning rate (default 3e-4; the shipped eleventh run: 1e-3)")
    parser.add_argument("--dit-cooldown", type=float, default=None, metavar="F",
                        help="a new run's learning rate falls linearly to 0 over the last F of the DiT's budget "
                             "(its minutes or --dit-steps, counted over all parts of the run; default 0)")
    parser.add_argument("--object-scale", type=float, default=None,
                        help="a new run's object radius factor (default 1; 1.5 to 2 give the codec room for "
                             "the shapes' outlines), written to model_index.json")
    parser.add_argument("--upright", action="store_true",
                        help="a new run draws every object starting at angle 0 rather than a random angle (the "
                             "few-step stream's mean over angles is a blob), written to model_index.json")
    parser.add_argument("--self-context", type=float, default=None,
                        help="a new run's share of each DiT batch whose context is the model's own prediction "
                             "(default 0.5)")
    parser.add_argument("--sigma-uniform", type=float, default=None,
                        help="a new run's share of chunks noised to a uniform sigma rather than the schedule's "
                             "(default 0.5)")
    parser.add_argument("--export-only", nargs="?", const="", default=None, metavar="DIR",
                        help="write the model folder (default OUT/model) from the latest checkpoint and stop; "
                             "safe while a run is still training into OUT; --schedule and --shift here set the "
                             "sampling the folder names (one measured with evaluate --schedule)")
    parser.add_argument("--export-dtype", choices=EXPORT_DTYPES, default=None,
                        help="how the model folder stores the DiT and text encoder (default float32; float16 "
                             "halves them, room for a larger DiT within the 25 MB); a new run's, or with "
                             "--export-only this folder's")
    parser.add_argument("--export-weights", choices=EXPORT_WEIGHTS, default="ema",
                        help="with --export-only: the DiT's EMA weights (default, what a run exports) or the "
                             "training weights the optimizer holds (what the EMA's lag behind them costs)")


def run(args) -> int:
    out = Path(args.out)
    latest = Trainer.latest(out)
    if args.export_only is not None:
        return export_only(out, latest, args.export_only or None, args.schedule, args.shift, args.export_weights,
                           args.export_dtype)
    if args.export_weights != "ema":
        raise UserError("--export-weights goes with --export-only (a run exports its EMA weights)")
    if args.minutes is None and (args.dit_steps is None or (args.codec_steps is None and not args.codec_from
                                                            and not args.dit_from)):
        raise UserError("give --minutes, or both --codec-steps and --dit-steps (--dit-steps alone with --codec-from "
                        "or --dit-from)")
    if args.codec_from and args.dit_from:
        raise UserError("--dit-from takes the model folder's codec too: give one of --codec-from and --dit-from")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to torch")
    if latest is not None and not args.resume:
        raise UserError(f"--out {out}: holds a run (checkpoint {latest.name}); add --resume or pick another folder")
    if args.resume and latest is not None:
        cfg = Config.from_json(json.loads((latest / "state.json").read_text())["config"])
    else:
        cfg = {"default": Config, "proxy": Config.proxy, "small": Config.small, "tiny": Config.tiny}[args.config]()
        cfg.seed = args.seed
        if args.shift is not None:
            cfg.shift = args.shift
        if args.sampler is not None:
            cfg.sampler = args.sampler
        if args.export_dtype is not None:
            cfg.export_dtype = args.export_dtype
        if args.schedule is not None:
            cfg.schedule = parse_schedule(args.schedule)
        # (option, accepted, what it must be, and the transformer config key it sets, or None: the Config field)
        for name, ok, what, key in (
                ("sigma_uniform", lambda v: 0.0 <= v <= 1.0, "a share, between 0 and 1", None),
                ("self_context", lambda v: 0.0 <= v <= 1.0, "a share, between 0 and 1", None),
                ("dit_outline_weight", lambda v: 0.0 <= v < float("inf"), "a weight, 0 or more", None),
                ("dit_sink_weight", lambda v: 0.0 < v < float("inf"), "a weight, more than 0", None),
                ("dit_twins", lambda v: 0.0 <= v <= 1.0, "a share, between 0 and 1", None),
                ("dit_rotating", lambda v: 0.0 <= v <= 1.0, "a share, between 0 and 1", None),
                ("dit_batch", lambda v: v >= 1, "at least one clip", None),
                ("dit_openings", lambda v: v >= 0, "a count of clips, 0 or more", None),
                ("opening_sigma_floor", lambda v: 0.0 <= v < 1.0, "a sigma, 0 or more and under 1", None),
                ("dit_lr", lambda v: 0.0 < v < 1.0, "a learning rate, more than 0 and under 1", None),
                ("dit_cooldown", lambda v: 0.0 <= v <= 1.0, "a share of the budget, between 0 and 1", None),
                ("codec_batch", lambda v: v >= 1, "at least one clip", None),
                ("object_scale", lambda v: 0.0 < v <= data.MAX_OBJECT_SCALE,
                 f"a radius factor, more than 0 and at most {data.MAX_OBJECT_SCALE:g}", None),
                ("dit_layers", lambda v: v >= 1, "at least one layer", "num_layers"),
                ("dit_heads", lambda v: v >= 1, "at least one head", "num_attention_heads"),
                ("dit_head_dim", lambda v: v >= 8 and v % 2 == 0, "even and at least 8", "attention_head_dim"),
                ("dit_ffn", lambda v: v >= 1, "at least 1", "ffn_dim")):
            value = getattr(args, name)
            if value is not None:
                if not ok(value):
                    raise UserError(f"--{name.replace('_', '-')} {value:g}: {what}")
                if key is None:
                    setattr(cfg, name, value)
                else:
                    cfg.transformer = dict(cfg.transformer, **{key: value})
        if args.dit_patch is not None:
            cfg.transformer = dict(cfg.transformer, patch_size=(1, args.dit_patch, args.dit_patch))
        if args.dit_object_weight is not None:
            cfg.dit_object_weight = max(0.0, args.dit_object_weight)
        if args.upright:
            cfg.upright = True
        if args.one_way_spin:
            cfg.one_way_spin = True
        if args.spin_speed is not None:
            if not 0 < args.spin_speed <= 10:
                raise UserError(f"--spin-speed {args.spin_speed}: give radians a second in (0, 10] (the clips draw "
                                "1 to 2.5)")
            cfg.spin_speed = args.spin_speed
        if args.opening_swap:
            if not (cfg.dit_twins and cfg.dit_openings):
                raise UserError("--opening-swap exchanges the outlines of twin-pair openings: give --dit-twins and "
                                "--dit-openings too")
            cfg.opening_swap = True
        if args.clip_swap:
            if not cfg.dit_twins:
                raise UserError("--clip-swap exchanges the outlines of twin-pair clips: give --dit-twins too")
            cfg.clip_swap = True
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    progress = Progress()
    # the worker drawing specs ahead pays where the host queues GPU work; on a CPU it only takes a core
    trainer = Trainer(out, cfg, args.device, progress, compile=args.compile, prefetch=args.device.startswith("cuda"))
    if args.resume and latest is not None:
        trainer.load_checkpoint(latest)
        progress(f"resumed from {latest} (stage {trainer.stage}, steps {trainer.steps})")
    elif args.dit_from:
        trainer.take_model(args.dit_from)
    elif args.codec_from:
        trainer.take_codec(args.codec_from)
    dit_steps = None
    if args.dit_steps is not None:
        relative, count = args.dit_steps
        dit_steps = trainer.steps["dit"] + count if relative else count
        if relative:
            progress(f"DiT steps: {count} more, to step {dit_steps}")
    stopping = {"flag": False}

    def on_signal(signum, _frame):
        progress(f"signal {signum}: checkpointing and stopping")
        stopping["flag"] = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        trainer.run(args.minutes, args.codec_steps, dit_steps, args.checkpoint_every, args.log_every,
                    stop=lambda: stopping["flag"])
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if trainer.steps["dit"] > 0:
        folder = trainer.export()
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        if size > MAX_BYTES:
            progress(f"warning: the model folder is {size / 1e6:.1f} MB, over the 25 MB budget")
    return 0


def _store_as(folder: Path, dtype: torch.dtype) -> None:
    """Rewrite a saved folder's safetensors with their floating-point tensors in `dtype` (the files, not the
    module: casting a diffusers model itself warns of the modules it keeps in float32 to run, which is not
    at issue for storage; the loaders cast back to the dtype they run in)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}, str(path),
                  metadata=metadata)


def parse_schedule(text: str) -> tuple[float, ...]:
    try:
        steps = tuple(float(t) for t in text.split(","))
    except ValueError:
        raise UserError(f"--schedule {text}: expected timesteps separated by commas, e.g. 1000,750,500,250") from None
    if len(steps) != len(SCHEDULE) or any(not 0 < t <= 1000 for t in steps) or any(
            a <= b for a, b in zip(steps, steps[1:])):
        raise UserError(f"--schedule {text}: {len(SCHEDULE)} timesteps in (0, 1000], decreasing (the engine "
                        "runs 4 steps, and bends target them by number)")
    return steps


def export_only(out: Path, latest: Path | None, folder: str | None, schedule: str | None = None,
                shift: float | None = None, weights: str = "ema", dtype: str | None = None) -> int:
    """The model as of the latest checkpoint (a look at a run in progress), exported on the CPU, optionally
    naming another sampling schedule than the one it trained with."""
    if latest is None:
        raise UserError(f"--out {out}: no checkpoint to export")
    cfg = Config.from_json(json.loads((latest / "state.json").read_text())["config"])
    if schedule is not None:
        cfg.schedule = parse_schedule(schedule)
    if shift is not None:
        cfg.shift = shift
    if dtype is not None:
        cfg.export_dtype = dtype
    trainer = Trainer(out, cfg, "cpu")
    trainer.load_checkpoint(latest, noise=False)
    if trainer.steps["dit"] == 0:
        raise UserError(f"checkpoint {latest.name}: the DiT has not trained yet (codec stage)")
    trainer.export(folder, weights)
    return 0


def main(argv=None) -> int:
    return module_main("python -m instrument.sketch.train", __doc__, configure, run, argv)


if __name__ == "__main__":
    sys.exit(main())
