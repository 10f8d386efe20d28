"""Speed: one compiled transformer block for every layer and pass, one CUDA graph per pass shape.

Regional compilation: `StreamingDiT.block` is compiled once and reused by all layers (their weights are
inputs, not constants) and by all passes (`layer` and `step` arrive as device tensors), so a cold start
compiles one block, not a 30-layer model. Compile artefacts persist in the user cache directory
(~/.cache/instrument/inductor), so the second start is fast.

CUDA graphs: once the KV cache is full every pass of every chunk has the same shapes, so the whole pass
(30 compiled blocks and the glue around them) is captured once and replayed. Everything a pass reads
lives at a fixed address: the latents, timestep, step and RoPE tables are copied into static inputs, the
KV cache and the prompt's cross-attention K/V are written in place, and every bend reads its knobs from
its own preallocated tensors. So knobs, prompts and blends change between replays without a recompile
or a recapture; only a structural change (another patch's bends, another size) captures a new graph.
"""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch


MAX_GRAPHS = 4  # captured graphs kept (one per recent patch / probe set); older ones are released


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "instrument" / "inductor"


def fastest_attention():
    """SDPA backends in order of preference (INSTRUMENT_ATTENTION=cudnn|flash|efficient puts one first)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.MATH]
    first = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}.get(os.environ.get("INSTRUMENT_ATTENTION", ""))
    if first is not None:
        order = [first] + [b for b in order if b != first]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # older torch: no priority order, let it choose among these
        return sdpa_kernel(order)


class PassRunner:
    """Runs DiT passes eagerly, compiled, or replayed from captured CUDA graphs."""

    def __init__(self, dit, device, compile: bool = True, graphs: bool = True, progress=None,
                 backend="inductor"):
        self.dit = dit
        self.device = torch.device(device)
        self.progress = progress or (lambda m: None)
        self.compile = compile
        self.backend = backend  # the tiny decoder compiles with it too
        self.graphs = graphs and self.device.type == "cuda"
        self.captured: dict = {}
        self.captures = 0
        self.pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self.compiled_block = None
        self.attention = fastest_attention if self.device.type == "cuda" else nullcontext
        self.steps = None
        if compile:
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir()))
            os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
            os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
            from torch._dynamo import config as cfg

            for knob in ("recompile_limit", "cache_size_limit"):
                if hasattr(cfg, knob):
                    setattr(cfg, knob, max(getattr(cfg, knob), 64))
            self.compiled_block = torch.compile(dit.block, dynamic=False, backend=backend)
            dit.layer_ids = [torch.tensor([i], device=self.device) for i in range(dit.layers)]
        self.step_ids: dict[int, torch.Tensor] = {}

    def _step(self, step: int, steps: int) -> torch.Tensor:
        # context pass (-1) -> the last index of every step-weight vector
        index = steps if step < 0 else step
        t = self.step_ids.get(index)
        if t is None:
            t = self.step_ids[index] = torch.tensor([index], device=self.device)
        return t

    @torch.no_grad()
    def __call__(self, latents, timestep, context, cache, rope, step: int, steps: int):
        dit = self.dit
        steady = cache.full and cache.key_mask is None
        if not self.compile or not steady:
            dit.run_block = dit.block
            with self.attention():
                return dit(latents, timestep, context, cache, rope, step)
        dit.run_block = self.compiled_block
        step_t = self._step(step, steps)
        if not self.graphs:
            with self.attention():
                return dit(latents, timestep, context, cache, rope, step_t)
        # What a graph bakes in: shapes, and the very objects (bends, probes, prompt buffers) it reads.
        key = (tuple(latents.shape), cache.valid_tokens, tuple(map(id, dit.bends.bends)),
               tuple(map(id, dit.bends.probes)), id(context))
        g = self.captured.pop(key, None)
        if g is None:
            g = self._capture(key, latents, timestep, context, cache, rope, step_t)
        self.captured[key] = g  # most recent last: toggling back to a recent patch or probe replays
        while len(self.captured) > MAX_GRAPHS:
            self.captured.pop(next(iter(self.captured)))
        g["latents"].copy_(latents)
        g["timestep"].copy_(timestep)
        g["step"].copy_(step_t)
        g["cos"].copy_(rope[0])
        g["sin"].copy_(rope[1])
        g["graph"].replay()
        return g["out"]

    def _capture(self, key, latents, timestep, context, cache, rope, step_t):
        t0 = time.perf_counter()
        self.progress("capturing the steady-state pass as a CUDA graph (compiling the block if needed)")
        g = {"latents": latents.clone(), "timestep": timestep.clone(), "step": step_t.clone(),
             "cos": rope[0].clone(), "sin": rope[1].clone()}
        args = (g["latents"], g["timestep"], context, cache, (g["cos"], g["sin"]), g["step"])
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), self.attention():
            for i in range(2):  # compile and settle allocations; writes the same cache slots the pass will
                debug = i == 1 and bool(os.environ.get("INSTRUMENT_SYNC_DEBUG"))
                if debug:
                    torch.cuda.set_sync_debug_mode("error")  # name the op that would break the capture
                try:
                    self.dit(*args)
                finally:
                    if debug:
                        torch.cuda.set_sync_debug_mode(0)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), self.attention():
            g["out"] = self.dit(*args)
        g["graph"] = graph
        self.captures += 1
        self.progress(f"captured in {time.perf_counter() - t0:.1f} s")
        return g
