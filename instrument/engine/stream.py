"""The public engine: load once, then stream video chunk by chunk, for ever.

    engine = Engine.load()                        # the embedded default; or model="/path/Wan2.1-T2V-1.3B"
    stream = engine.stream("a red circle", seed=1)
    for chunk in stream:                          # chunk.frames: uint8 [n, H, W, 3] on the CPU
        ...

Generation follows the Self-Forcing family: each chunk of latent frames starts from noise and is denoised
in a few steps (default 1000, 750, 500, 250 warped with shift 5), predicting x0 and re-noising to the
next level between steps (fresh noise for the distilled Self-Forcing generators; the noise the model
implies, DDIM, for a plain flow-matching model such as the sketch model); the clean chunk then runs
once more at t = 0 to write its keys and values into the cache that later chunks attend to. The cache
keeps a sink of the first frames and a rolling window of the latest, so memory stays flat however long
the stream runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..errors import UserError
from ..params import ParamSpace, ParamSpec
from ..progress import Progress
from .graphs import PassRunner
from .dit import CONTEXT_STEP, KVCache, PromptContext, StreamingDiT, TokenGrid, rope_tables
from .loading import Components, load_components
from .text import EncodedPrompt, PromptEncoder

SCHEDULE = (1000.0, 750.0, 500.0, 250.0)
SHIFT = 5.0
SAMPLERS = ("renoise", "ddim")
VAE_STRIDE = (4, 8, 8)
WAN_SIZE = (832, 480)  # width, height: what Wan 2.1 was trained at


def warp(t: float, shift: float = SHIFT) -> float:
    """Flow-matching sigma of a timestep (0..1000) under a shift, as Wan's scheduler computes it."""
    s = t / 1000.0
    return shift * s / (1.0 + (shift - 1.0) * s)


@dataclass(frozen=True)
class StreamSettings:
    width: int
    height: int
    chunk: int = 3  # latent frames per chunk
    sink: int = 3  # latent frames kept for ever at the start of the cache
    window: int = 12  # latent frames of the rolling window, the current chunk included
    schedule: tuple[float, ...] = SCHEDULE
    shift: float = SHIFT
    # Between steps: "renoise" draws fresh noise around the predicted x0, as the Self-Forcing family does
    # (their generators are distilled to predict sharp samples); "ddim" keeps the noise the model implies,
    # which a plain flow-matching model whose x0 is still a blur needs (the sketch models up to the ninth
    # run: fresh noise around a mean never committed to one picture). A model folder names its own.
    sampler: str = "renoise"
    # Decode chunk i on a second CUDA stream while chunk i+1's DiT runs (the DiT of i+1 is launched before
    # chunk i is returned, with the knobs as they are then). On the CPU it changes the order, not the speed.
    overlap_decode: bool = False

    def validate(self, patch=(1, 2, 2)) -> None:
        mult = VAE_STRIDE[1] * patch[1]
        if self.width % mult or self.height % mult or self.width <= 0 or self.height <= 0:
            raise UserError(f"--size {self.width}x{self.height}: width and height must be positive multiples "
                            f"of {mult}")
        if self.chunk not in (1, 2, 3, 4):
            raise UserError(f"--chunk {self.chunk}: use 1 or 3 latent frames (2 and 4 work too)")
        if self.sampler not in SAMPLERS:
            raise UserError(f"sampler {self.sampler!r}: expected one of {', '.join(SAMPLERS)}")
        if self.window < self.chunk or self.window % self.chunk or self.sink % self.chunk:
            raise UserError(f"cache window {self.window} and sink {self.sink} must be multiples of the chunk "
                            f"size {self.chunk} (window >= chunk)")

    @property
    def sigmas(self) -> list[float]:
        return [warp(t, self.shift) for t in self.schedule]


@dataclass
class _Launched:
    """A chunk whose DiT work is enqueued on the device: its clean latents exist once that work is done."""

    first: int
    x0: torch.Tensor
    arrived: float | None
    t0: float  # host time its launch began
    t1: float  # ... and ended (on the CPU the work is done by then; on a GPU only queued)
    events: tuple | None  # CUDA events around its DiT work


@dataclass
class Chunk:
    index: int
    first_frame: int  # absolute latent frame index of the chunk's first frame
    latents: torch.Tensor  # clean latents [1, C, f, h, w]
    frames: torch.Tensor  # uint8 [n, H, W, 3] on the CPU
    computed_with: float | None = None  # arrival time of the earliest control change applied here
    timings: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)  # NaN guard reports, for the HUD


class Engine:
    """Weights, text encoder and decoder, loaded once; `stream()` makes as many streams as needed."""

    def __init__(self, comps: Components, device, dtype, decoder: str = "wan", tiny_decoder: str | None = None,
                 progress=None, compile: bool = False, graphs: bool = False, fp8: bool = False):
        self.progress = progress or Progress()
        self.device = torch.device(device)
        self.dtype = dtype
        self.components = comps
        self.fp8 = fp8
        if fp8:
            self._quantize_fp8()
        self.dit = StreamingDiT(comps.transformer)
        self.runner = PassRunner(self.dit, self.device, compile=compile, graphs=graphs, progress=self.progress)
        self.text = PromptEncoder(comps.tokenizer, comps.text_encoder, comps.text_len, self.device,
                                  dtype=dtype)
        self.params = ParamSpace()
        self.params.declare(ParamSpec("prompt/blend", 0.0, 1.0, 0.0, "", "mix from prompt A (0) to prompt B (1)"))
        self.decoder_kind = decoder
        self.tiny_decoder_path = tiny_decoder
        if decoder == "tiny":
            self._decoder = self._load_tiny(tiny_decoder)
        elif decoder != "wan":
            raise UserError(f"--decoder {decoder}: expected wan or tiny")

    def _quantize_fp8(self) -> None:
        from . import fp8

        ok, why = fp8.supported(self.device)
        if not ok:
            raise UserError(f"--fp8: this GPU cannot run FP8 matmuls ({why}); drop --fp8")
        count = fp8.quantize_blocks(self.components.transformer)
        self.progress(f"FP8: {count} linear layers of the DiT's blocks quantized to e4m3 ({why})")

    @classmethod
    def load(cls, model: str | None = None, checkpoint: str | None = None, device: str = "cpu", dtype=None,
             decoder: str = "wan", tiny_decoder: str | None = None, progress=None, compile: bool | None = None,
             graphs: bool | None = None, fp8: bool = False) -> "Engine":
        """Load weights and build the engine. compile / graphs default to on for CUDA, off for the CPU;
        fp8 runs the blocks' linear layers in e4m3 (instrument/engine/fp8.py)."""
        progress = progress or Progress()
        if device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA GPU is visible to torch")
        if dtype is None:
            dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        comps = load_components(model, checkpoint, device, dtype, progress)
        cuda = torch.device(device).type == "cuda"
        engine = cls(comps, device, dtype, decoder, tiny_decoder, progress,
                     compile=cuda if compile is None else compile, graphs=cuda if graphs is None else graphs,
                     fp8=fp8)
        progress(f"ready: {comps.source} on {device} ({str(dtype).replace('torch.', '')})")
        return engine

    def _load_tiny(self, path):
        from .taehv import TAEHV, TAEHVStreamingDecoder

        if path is None and self.components.random_weights:  # a random model decodes alike
            self.progress("tiny decoder: TAEHV with random weights")
            model = TAEHV().eval()
        elif path is None:
            raise UserError("--decoder tiny needs --tiny-decoder FILE (taew2_1.pth from madebyollin/taehv)")
        else:
            model = TAEHV.from_file(path)
        # half precision on a GPU, as TAEHV is published and as every bench round measured it
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        return TAEHVStreamingDecoder(model.to(device=self.device, dtype=dtype))

    @property
    def captures(self) -> int:
        """CUDA graphs captured so far, the DiT's passes' and the tiny decoder's (bench: none while knobs move)."""
        return self.runner.captures + (getattr(self._decoder, "captures", 0) if self.decoder_kind == "tiny" else 0)

    @property
    def decoder_name(self) -> str:
        """What turns latents into frames: "tiny" (TAEHV), "wan" (the Wan VAE) or "sketch codec"."""
        from ..sketch.codec import Codec

        if self.decoder_kind == "tiny":
            return "tiny"
        return "sketch codec" if isinstance(self.components.vae, Codec) else "wan"

    def make_decoder(self):
        if self.decoder_kind == "tiny":
            self._decoder.reset()
            self._decoder.graphs = self.runner.graphs  # its steady chunk replays from a CUDA graph too
            self._decoder.compile = self.runner.backend if self.runner.compile else None
            self._decoder.progress = self.progress
            return self._decoder
        from ..sketch.codec import Codec, SketchStreamingDecoder
        from .vae import WanStreamingDecoder

        if isinstance(self.components.vae, Codec):
            return SketchStreamingDecoder(self.components.vae)
        return WanStreamingDecoder(self.components.vae)

    def set_probes(self, probes) -> None:
        """Arm probes (structural); they stay armed across patch changes until replaced."""
        from ..bends.sites import BendSites

        self.dit.bends = BendSites(self.dit.bends.bends, probes)

    @torch.no_grad()
    def record_activations(self, prompt: str, seed: int = 0, chunks: int = 2, size=None) -> dict:
        """Per-unit activation summaries for k-means targets ('cluster 2 of 8'): runs a short stream
        with probes on every layer and returns {"neurons": [ffn, layers], "channels": [dim, layers]}."""
        from ..bends.probe import Probe
        from ..bends.sites import BendSites

        saved = self.dit.bends
        ffn, hid = Probe("ffn.mean", self.dims, self.device), Probe("hidden.mean", self.dims, self.device)
        self.dit.bends = BendSites(saved.bends, [ffn, hid])
        try:
            stream = self.stream(prompt, seed=seed, size=size)
            for _ in range(chunks):
                stream.next()
        finally:
            self.dit.bends = saved
        self.activations = {"neurons": ffn.result().T.contiguous(), "channels": hid.result().T.contiguous()}
        return self.activations

    def set_bends(self, sites) -> float:
        """Arm a new set of bends (a structural change, between patches); returns the seconds it took."""
        t0 = time.perf_counter()
        self.params.remove_prefix("bend/")
        for b in sites.bends:
            for spec in b.specs():
                self.params.declare(spec)
        self.dit.bends = sites
        return time.perf_counter() - t0

    @property
    def dims(self):
        from ..bends.bend import Dims

        cfg = self.components.transformer.config
        return Dims(cfg.num_layers, cfg.num_attention_heads, cfg.num_attention_heads * cfg.attention_head_dim,
                    cfg.ffn_dim, self.components.text_len, len(SCHEDULE))

    @property
    def default_size(self) -> tuple[int, int]:
        return self.components.native_size or WAN_SIZE

    def stream(self, prompt: str = "", seed: int = 0, size: tuple[int, int] | None = None, chunk: int = 3,
               sink: int = 3, window: int = 12, schedule=None, shift: float | None = None,
               sampler: str | None = None, overlap_decode: bool = False) -> "Stream":
        """schedule, shift and sampler default to what the model folder says (the sketch model), else Wan's."""
        w, h = size or self.default_size
        native = self.components.sampling or {}
        if schedule is None:
            schedule = native.get("schedule", SCHEDULE)
        settings = StreamSettings(w, h, chunk, sink, window, tuple(float(t) for t in schedule),
                                  float(native.get("shift", SHIFT)) if shift is None else shift,
                                  str(native.get("sampler", "renoise")) if sampler is None else sampler,
                                  overlap_decode)
        settings.validate(self.dit.patch)
        return Stream(self, settings, prompt, seed)


class Stream:
    def __init__(self, engine: Engine, settings: StreamSettings, prompt: str, seed: int):
        self.engine = engine
        self.settings = settings
        dit = engine.dit
        cfg = engine.components.transformer.config
        self.latent_shape = (1, cfg.in_channels, settings.chunk, settings.height // VAE_STRIDE[1],
                             settings.width // VAE_STRIDE[2])
        self.grid = TokenGrid(settings.chunk // dit.patch[0], self.latent_shape[3] // dit.patch[1],
                              self.latent_shape[4] // dit.patch[2])
        self.cache = KVCache(dit.layers, 1, dit.heads, dit.head_dim, self.grid.per_frame, settings.sink,
                             settings.window, engine.device, engine.dtype)
        # Clean latents of the frames the cache holds, in the same slots: a prompt switch re-encodes them.
        self.latent_ring = torch.zeros(1, cfg.in_channels, self.cache.slots, *self.latent_shape[3:],
                                       device=engine.device, dtype=engine.dtype)
        self.warnings: list[str] = []
        self.sync_timing = False  # bench: wait for the GPU to split DiT from decode time
        self._launched: _Launched | None = None  # overlap_decode: the next chunk, already on its way
        self._emitted_at: float | None = None
        self.prompts: list[EncodedPrompt | None] = [engine.text.encode(prompt), None]
        self.context: PromptContext | None = None
        self._context_key = None
        self._recache = False
        self.seed = seed
        self.reset(seed)

    # -- control between chunks -----------------------------------------------------------------
    def reset(self, seed: int | None = None) -> None:
        """Start over from frame 0 (new seed if given)."""
        if seed is not None:
            self.seed = seed
        self.generator = torch.Generator(self.engine.device).manual_seed(self.seed)
        self.cache.reset()
        self.latent_ring.zero_()
        self.decoder = self.engine.make_decoder()
        self.frame = 0
        self.index = 0
        self._recache = False
        self._launched = None
        self._emitted_at = None

    def warm_up(self, progress=None, limit: int = 64) -> int:
        """Stream until the steady chunk has compiled, been captured and replayed: the KV cache full, then two
        chunks more (the first captures, the second replays). Returns the chunks it took. The chunks advance the
        stream, as any others would (play shows on from there)."""
        chunks = 0
        steady_after = (self.settings.sink + self.settings.window) // self.settings.chunk
        while not self.cache.full or chunks < 2 + steady_after:
            c = self.next()
            chunks += 1
            if progress is not None:
                progress(f"  warm-up chunk {chunks} of about {2 + steady_after} ({c.timings['chunk_s'] * 1000:.0f} ms)")
            if chunks >= limit:
                break
        return chunks

    def set_prompt(self, text: str, slot: int = 0) -> EncodedPrompt:
        """Prompt A (slot 0) or B (slot 1). Changing A re-encodes the cached window with the new prompt."""
        encoded = self.engine.text.encode(text)
        if self.prompts[slot] is None or self.prompts[slot].text != text:
            self.prompts[slot] = encoded
            if slot == 0 and self.frame > 0:
                self._recache = True
        return encoded

    @property
    def prompt(self) -> EncodedPrompt:
        return self.prompts[0]

    # -- generation -----------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> Chunk:
        return self.next()

    @torch.no_grad()
    def next(self) -> Chunk:
        if self.settings.overlap_decode:
            return self._next_overlapped()
        launched = self._launch()
        x0 = self._settle(launched)
        if self.sync_timing and self.engine.device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        frames, copied = self._to_host(self._decode(x0))
        if copied is not None:
            copied.synchronize()
        t2 = time.perf_counter()
        return self._emit(launched, x0, frames, {"dit_s": t1 - launched.t0, "decode_s": t2 - t1,
                                                 "chunk_s": t2 - launched.t0})

    def _next_overlapped(self) -> Chunk:
        """Chunk i's frames, with chunk i+1's DiT queued on the GPU right behind chunk i's decode and its copy to
        the host, before the host waits for them: the GPU does not idle while the host hands chunk i over and
        prepares chunk i+1. One stream, so the decode never shares the SMs with the DiT: round 5 measured a
        second decode stream slowing the DiT by more than it hid (74.5 against 68.0 ms a pass)."""
        if self._launched is None:
            self._launched = self._launch()
        launched, self._launched = self._launched, None
        x0 = self._settle(launched)  # the host waits here for chunk i's DiT, not for anything later
        t_d0 = time.perf_counter()
        d0 = self._event()
        frames = self._decode(x0)
        d1 = self._event()
        frames, copied = self._to_host(frames)  # queued before chunk i+1, which the host launches next
        t_decode = time.perf_counter()
        self._launched = self._launch()  # chunk i+1's DiT, queued behind chunk i's decode and copy
        if copied is not None:
            copied.synchronize()  # chunk i's frames are on the host; chunk i+1's DiT runs on
            dit_s = launched.events[0].elapsed_time(launched.events[1]) / 1000.0
            decode_s = d0.elapsed_time(d1) / 1000.0
        else:  # everything ran in turn on the host: the launch's own time, the rest is decoding
            dit_s, decode_s = launched.t1 - launched.t0, t_decode - t_d0
        now = time.perf_counter()
        period = now - (self._emitted_at if self._emitted_at is not None else launched.t0)
        self._emitted_at = now
        return self._emit(launched, x0, frames, {"dit_s": dit_s, "decode_s": decode_s, "chunk_s": period})

    def _to_host(self, frames: torch.Tensor):
        """(frames on the host, the event after their copy, or None where nothing was copied). The copy goes into
        page-locked memory without making the host wait: round 8's profile showed a pageable copy taking 5 ms of
        GPU time a chunk at 832x480, and the host blocked behind it."""
        if not frames.is_cuda:
            return frames.to("cpu"), None
        host = torch.empty(frames.shape, dtype=frames.dtype, pin_memory=True)
        host.copy_(frames, non_blocking=True)
        return host, self._event()

    def _event(self):
        if self.engine.device.type != "cuda":
            return None
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def _launch(self) -> _Launched:
        """Enqueue one chunk's DiT work (4 steps and the clean pass) with the knobs as they are now."""
        e = self.engine
        t0 = time.perf_counter()
        arrived = e.params.take_arrivals()
        self._take_controls()
        s = self.settings
        first = self.frame
        start = self._event()
        self.cache.place(first, s.chunk)
        rope = rope_tables(self.grid, first, e.dit.head_dim, device=e.device)
        sigmas = s.sigmas
        x = self._noise()
        x0 = x
        for step, sigma in enumerate(sigmas):
            t = torch.full((1,), sigma * 1000.0, device=e.device)
            v = e.runner(x, t, self.context, self.cache, rope, step, len(sigmas))
            x0 = (x.float() - sigma * v.float()).to(e.dtype)
            if step + 1 < len(sigmas):
                nxt = sigmas[step + 1]
                noise = self._noise().float() if s.sampler == "renoise" else x0.float() + v.float()
                x = ((1.0 - nxt) * x0.float() + nxt * noise).to(e.dtype)
        self._keep(x0, first, rope)
        return _Launched(first, x0, arrived, t0, time.perf_counter(), None if start is None else (start, self._event()))

    def _keep(self, x0: torch.Tensor, first: int, rope) -> None:
        """The clean pass: the chunk's keys and values at t = 0 become what later chunks attend to; the stream
        moves past it."""
        e = self.engine
        e.runner(x0, torch.zeros(1, device=e.device), self.context, self.cache, rope, CONTEXT_STEP,
                 len(self.settings.sigmas))
        for j in range(self.settings.chunk):
            self.latent_ring[:, :, self.cache.slot_of(first + j)] = x0[:, :, j]
        self.frame += self.settings.chunk

    def feed(self, x0: torch.Tensor) -> None:
        """Take clean latents [1, 16, chunk, h, w] as the stream's next chunk, as if it had drawn them (the same
        clean pass), so that the chunk after it continues from them: a real clip's first chunk as the context
        of `predict_clean`'s second. For analysis (`sketch.evaluate`'s later-chunk denoising), not for the
        render loop."""
        if tuple(x0.shape) != tuple(self.latent_shape):
            raise ValueError(f"feed: latents of shape {tuple(x0.shape)}, the stream's chunks are "
                             f"{tuple(self.latent_shape)}")
        e = self.engine
        self._take_controls()
        first = self.frame
        self.cache.place(first, self.settings.chunk)
        self._keep(x0.to(device=e.device, dtype=e.dtype), first,
                   rope_tables(self.grid, first, e.dit.head_dim, device=e.device))

    def _take_controls(self) -> None:
        """The knobs and the prompt as they are now, into the device tensors the passes read (and the cache
        re-encoded if the prompt switched)."""
        self.engine.dit.bends.load_values(self.engine.params, self.prompt, self.grid)
        self._update_context()
        if self._recache:
            self._recache_window()
            self._recache = False

    def predict_clean(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """The DiT's clean prediction (float32) for the next chunk's latents `x` noised to `sigma`, with the
        stream's prompt, cache and armed bends as they are (as its first step sees them). The stream does not
        advance: the next chunk's own passes overwrite the cache slots this pass writes. For analysis (what
        the model makes of a word, `sketch.evaluate`'s word use), not for the render loop."""
        e = self.engine
        self._take_controls()
        self.cache.place(self.frame, self.settings.chunk)
        rope = rope_tables(self.grid, self.frame, e.dit.head_dim, device=e.device)
        t = torch.full((1,), sigma * 1000.0, device=e.device)
        v = e.runner(x.to(device=e.device, dtype=e.dtype), t, self.context, self.cache, rope, 0,
                     len(self.settings.sigmas))
        return x.to(e.device).float() - sigma * v.float()

    def _settle(self, launched: _Launched) -> torch.Tensor:
        """Its clean latents, checked: waits for its DiT work; must run before the next chunk launches."""
        return self._recover_if_broken(launched.x0, launched.first)

    def _decode(self, x0: torch.Tensor) -> torch.Tensor:
        return self.decoder.decode(x0.float() if self.engine.device.type == "cpu" else x0)

    def _emit(self, launched: _Launched, x0, frames, timings) -> Chunk:
        chunk = Chunk(self.index, launched.first, x0, frames, launched.arrived, timings, list(self.warnings))
        self.index += 1
        return chunk

    def _recover_if_broken(self, x0: torch.Tensor, first: int) -> torch.Tensor:
        """A bend that blew up past its guards must not poison the stream: report, repair, re-cache."""
        caught = self.engine.dit.bends.take_bad()
        self.warnings = [f"NaN guard: bend '{name}' produced {int(n)} non-finite values (zeroed)"
                         for name, n in caught.items()]
        if bool(torch.isfinite(x0).all()):
            return x0
        self.warnings.append("NaN guard: the chunk went non-finite; repaired and the cache rebuilt")
        x0 = torch.nan_to_num(x0, nan=0.0, posinf=0.0, neginf=0.0)
        for j in range(self.settings.chunk):
            self.latent_ring[:, :, self.cache.slot_of(first + j)] = x0[:, :, j]
        # Rebuild the cache from the (finite) latents with the bends out of the way: whatever blew up
        # must not live on in what every later chunk attends to.
        from ..bends.sites import BendSites

        armed, self.engine.dit.bends = self.engine.dit.bends, BendSites.empty()
        try:
            self._recache_window(end=first + self.settings.chunk)
        finally:
            self.engine.dit.bends = armed
        return x0

    def _noise(self) -> torch.Tensor:
        return torch.randn(self.latent_shape, generator=self.generator, device=self.engine.device,
                           dtype=torch.float32).to(self.engine.dtype)

    def _update_context(self) -> None:
        a, b = self.prompts
        blend = self.engine.params.get("prompt/blend") if b is not None else 0.0
        key = (a.text, None if b is None else b.text, blend)
        if key == self._context_key:
            return
        emb = a.embeddings if b is None or blend == 0.0 else torch.lerp(a.embeddings, b.embeddings, blend)
        new = self.engine.dit.prompt_context(emb)
        if self.context is None:
            self.context = new
        else:  # same storage, so captured graphs keep reading the live prompt
            for dst, src in zip(self.context.k + self.context.v, new.k + new.v):
                dst.copy_(src)
        self._context_key = key

    def _recache_window(self, end: int | None = None) -> None:
        """Re-encode the cached frames under the current prompt, oldest first (LongLive's prompt switch)."""
        s, cache, e = self.settings, self.cache, self.engine
        end = self.frame if end is None else end
        frames = list(range(min(s.sink, end))) + list(range(max(s.sink, end - s.window), end))
        allowed = torch.zeros(cache.slots * cache.tokens_per_frame, dtype=torch.bool, device=e.device)
        tpf = cache.tokens_per_frame
        for i in range(0, len(frames), s.chunk):
            group = frames[i:i + s.chunk]
            for f in group:
                allowed[cache.slot_of(f) * tpf:(cache.slot_of(f) + 1) * tpf] = True
            cache.place(group[0], len(group), key_mask=allowed.clone())
            latents = torch.stack([self.latent_ring[:, :, cache.slot_of(f)] for f in group], dim=2)
            rope = rope_tables(self.grid, group[0], e.dit.head_dim, device=e.device)
            e.dit(latents, torch.zeros(1, device=e.device), self.context, cache, rope, CONTEXT_STEP)
        cache.key_mask = None
