"""Probes: summaries recorded at bend sites, for the probe view and for k-means targets.

A probe is armed like a bend (a structural change, between patches) and costs nothing when none is
armed. It accumulates into a preallocated device buffer during a chunk; `result()` reads it after the
chunk (the stage's probe view calls it from the render thread, once per chunk).

Kinds:
    cross.map      the chosen words' cross-attention map over the picture [F, H, W] (mean over heads)
    self.entropy   per-head entropy of self-attention, in nats [layers, heads] (on a subsample of queries)
    ffn.mean       per-neuron mean activation after the GELU [layers, ffn]
    hidden.mean    per-channel mean of the residual stream after each block [layers, dim]
"""

from __future__ import annotations

import torch

from .bend import Dims, layer_spec, pick, step_weights, token_weights
from .targets import parse_indices

KINDS = {"cross.map": "cross", "self.entropy": "self.keys", "ffn.mean": "ffn.hidden", "hidden.mean": "hidden"}
ENTROPY_QUERIES = 256  # queries sampled per pass for self-attention entropy


class Probe:
    def __init__(self, kind: str, dims: Dims, device, layers="all", steps="all", tokens: str = "all"):
        if kind not in KINDS:
            raise ValueError(f"unknown probe {kind!r}: one of {', '.join(KINDS)}")
        self.kind, self.site, self.dims = kind, KINDS[kind], dims
        self.device = torch.device(device)
        self.layer_w = torch.zeros(dims.layers, device=self.device)
        self.layer_w[parse_indices(layer_spec(layers, dims.layers), dims.layers, what="layer")] = 1
        self.step_w = step_weights(steps, dims.steps, self.device)
        self.tokens = tokens
        self.token_w = torch.zeros(dims.text_len, device=self.device)
        self._token_key = None
        self.buffer: torch.Tensor | None = None
        self.count = torch.zeros((), device=self.device)
        rows = {"self.entropy": dims.heads, "ffn.mean": dims.ffn, "hidden.mean": dims.dim}
        if kind in rows:
            self.buffer = torch.zeros(dims.layers, rows[kind], device=self.device)
            self.count = torch.zeros(dims.layers, 1, device=self.device)

    def load_values(self, prompt, grid) -> None:
        if self.kind == "cross.map":
            shape = (grid.frames, grid.height, grid.width)
            if self.buffer is None or tuple(self.buffer.shape) != shape:
                self.buffer = torch.zeros(shape, device=self.device)
            key = (prompt.text, prompt.length)
            if key != self._token_key:
                self.token_w.copy_(token_weights(self.tokens, prompt, self.dims.text_len))
                self._token_key = key

    def record(self, layer, step, x, *extra) -> None:
        # Weighted rather than skipped, so `layer` and `step` may be device tensors (compiled passes).
        w = pick(self.layer_w, layer) * pick(self.step_w, step)
        if self.kind == "cross.map":  # x: probabilities [B, heads, N, T]
            m = (x * self.token_w.to(x.dtype)).sum(-1).mean(dim=(0, 1))
            self.buffer += w * m.view_as(self.buffer).float()
            self.count += w
        elif self.kind == "ffn.mean" or self.kind == "hidden.mean":  # [B, N, C]
            self._accumulate(layer, w, x.float().mean(dim=(0, 1)))
        elif self.kind == "self.entropy":  # x: queries [B, N, H, D]; extra[0]: keys [B, H, M, D]
            keys = extra[0]
            stride = max(1, x.shape[1] // ENTROPY_QUERIES)
            q = x[:, ::stride].transpose(1, 2).float()
            p = (q @ keys.float().transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
            ent = -(p * p.clamp_min(1e-12).log()).sum(-1).mean(dim=(0, 2))
            self._accumulate(layer, w, ent)

    def _accumulate(self, layer, w, row):
        index = torch.as_tensor([layer], device=self.device) if isinstance(layer, int) else layer
        self.buffer.index_add_(0, index, (w * row).unsqueeze(0))
        self.count.index_add_(0, index, w.view(1, 1))

    def result(self, reset: bool = True) -> torch.Tensor:
        """The mean summary since the last reset, on the CPU (this syncs: call it after a chunk)."""
        if self.buffer is None:
            return torch.zeros(0)
        out = (self.buffer / self.count.clamp_min(1)).cpu()
        if reset:
            self.buffer.zero_()
            self.count.zero_()
        return out
