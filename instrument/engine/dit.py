"""The streaming Wan DiT: one chunk of latent frames through the transformer, causally, with a KV cache.

The weights and submodules are diffusers' `WanTransformer3DModel` (so real Wan folders load through
diffusers and its single-file converter); the forward is written out here, block by block, because
streaming needs what diffusers' forward cannot give: a per-layer KV cache with an attention sink and a
rolling window, RoPE that starts at the chunk's absolute frame index, cross-attention K/V computed once
per prompt, and the bend sites. Every place a bend reaches into the model is a call on `self.bends`
(see instrument/bends/sites.py); with no bends armed each call returns its input untouched.

Layouts: tokens are frame-major (token = f*h*w + y*w + x); attention tensors are [B, N, heads, head_dim]
as in diffusers; cache buffers are [B, heads, slots*tokens_per_frame, head_dim] so that SDPA reads the
keys contiguously.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_1d_rotary_pos_embed

CONTEXT_STEP = -1  # the `step` of the clean pass that writes the cache (bends can target it on its own)


@dataclass(frozen=True)
class TokenGrid:
    """The token layout of one chunk: frames x height x width after patchifying."""

    frames: int
    height: int
    width: int

    @property
    def per_frame(self) -> int:
        return self.height * self.width

    @property
    def tokens(self) -> int:
        return self.frames * self.per_frame


class KVCache:
    """Self-attention keys and values of past frames, in static buffers.

    Slots 0..sink-1 hold the first `sink` frames for ever (the attention sink); the remaining `window`
    slots are a ring holding the most recent frames, the current chunk included. Because RoPE is applied
    before caching, the order of slots does not matter to attention, so nothing is ever shifted: a new
    frame overwrites the slot of the frame that leaves the window. Slots fill in order, so before the ring
    wraps the valid slots are a prefix of the buffer.
    """

    def __init__(self, layers, batch, heads, head_dim, tokens_per_frame, sink, window, device, dtype):
        if window < 1 or sink < 0:
            raise ValueError("cache window must be >= 1 frame and sink >= 0")
        self.sink, self.window, self.tokens_per_frame = sink, window, tokens_per_frame
        self.slots = sink + window
        shape = (layers, batch, heads, self.slots * tokens_per_frame, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.token_index = torch.zeros(0, dtype=torch.long, device=device)
        self.valid_tokens = 0
        self.key_mask: torch.Tensor | None = None

    @property
    def full(self) -> bool:
        """Steady state: every slot holds a frame, so every pass has the same shapes from now on."""
        return self.valid_tokens == self.slots * self.tokens_per_frame

    def slot_of(self, frame: int) -> int:
        if frame < self.sink:
            return frame
        return self.sink + (frame - self.sink) % self.window

    def place(self, first_frame: int, frames: int, key_mask: torch.Tensor | None = None) -> None:
        """Point the next passes at the slots of frames [first_frame, first_frame+frames)."""
        tpf = self.tokens_per_frame
        slots = torch.tensor([self.slot_of(f) for f in range(first_frame, first_frame + frames)], dtype=torch.long)
        index = (slots[:, None] * tpf + torch.arange(tpf)).flatten()
        if self.token_index.shape != index.shape:
            self.token_index = torch.empty_like(index, device=self.k.device)
        # In place (captured graphs read this buffer), and from page-locked memory without waiting: a plain
        # copy would make the host wait for the GPU's queue, the previous chunk's decode included.
        cuda = self.token_index.is_cuda
        self.token_index.copy_(index.pin_memory() if cuda else index, non_blocking=cuda)
        self.valid_tokens = min(first_frame + frames, self.slots) * tpf
        self.key_mask = key_mask

    def layer(self, i: int) -> "LayerKV":
        return LayerKV(self.k[i], self.v[i], self.token_index, self.valid_tokens, self.key_mask)

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()
        self.valid_tokens = 0


class LayerKV(NamedTuple):
    """One layer's cache as the block sees it: buffers, where this chunk goes, how much is valid."""

    k: torch.Tensor  # [B, H, slots*tpf, D]
    v: torch.Tensor
    index: torch.Tensor  # token slots of the current chunk
    valid: int
    mask: torch.Tensor | None

    def write_and_read(self, k: torch.Tensor, v: torch.Tensor):
        """Store this chunk's k, v ([B, N, H, D]) and return all valid keys and values ([B, H, M, D])."""
        self.k.index_copy_(2, self.index, k.transpose(1, 2).to(self.k.dtype))
        self.v.index_copy_(2, self.index, v.transpose(1, 2).to(self.v.dtype))
        return self.k[:, :, : self.valid], self.v[:, :, : self.valid]


def rope_tables(grid: TokenGrid, first_frame: int, head_dim: int, theta: float = 10000.0, device=None):
    """cos/sin for a chunk whose first frame has absolute index `first_frame` ([1, N, 1, head_dim]).

    Same frequencies as diffusers' WanRotaryPosEmbed, but positions are computed (in float64) rather than
    looked up in a table that starts at frame 0 and ends at 1024: a stream has no end.
    """
    h_dim = w_dim = 2 * (head_dim // 6)
    t_dim = head_dim - h_dim - w_dim
    axes = []
    # Made where they are used: building them on the host and copying them over (10 MB at 832x480) would cost
    # the host milliseconds a chunk and make it wait for the GPU's queue.
    for dim, positions in (
        (t_dim, torch.arange(first_frame, first_frame + grid.frames, dtype=torch.float64, device=device)),
        (h_dim, torch.arange(grid.height, dtype=torch.float64, device=device)),
        (w_dim, torch.arange(grid.width, dtype=torch.float64, device=device)),
    ):
        axes.append(get_1d_rotary_pos_embed(dim, positions, theta, use_real=True,
                                            repeat_interleave_real=True, freqs_dtype=torch.float64))
    f, h, w = grid.frames, grid.height, grid.width
    tables = []
    for part in (0, 1):  # cos, sin
        t_, h_, w_ = (a[part] for a in axes)
        table = torch.cat([
            t_.view(f, 1, 1, -1).expand(f, h, w, -1),
            h_.view(1, h, 1, -1).expand(f, h, w, -1),
            w_.view(1, 1, w, -1).expand(f, h, w, -1),
        ], dim=-1)
        tables.append(table.reshape(1, f * h * w, 1, head_dim))
    return tables[0], tables[1]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


@dataclass
class PromptContext:
    """Cross-attention keys and values of one (blended) prompt, per layer: computed once, used every pass."""

    k: list[torch.Tensor]  # per layer [B, T, H, D]
    v: list[torch.Tensor]


class StreamingDiT(torch.nn.Module):
    def __init__(self, transformer, bends=None):
        super().__init__()
        from ..bends.sites import BendSites

        self.model = transformer
        cfg = transformer.config
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.attention_head_dim
        self.dim = self.heads * self.head_dim
        self.layers = cfg.num_layers
        self.patch = tuple(cfg.patch_size)
        self.out_channels = cfg.out_channels
        self.bends = bends if bends is not None else BendSites.empty()
        self.run_block = self.block  # instrument/engine/graphs.py swaps in a compiled block ...
        self.layer_ids: list[torch.Tensor] = []  # ... which takes the layer index as a device tensor

    # -- once per prompt ------------------------------------------------------------------------
    @torch.no_grad()
    def prompt_context(self, text_embeddings: torch.Tensor) -> PromptContext:
        ctx = self.model.condition_embedder.text_embedder(text_embeddings)
        ks, vs = [], []
        for blk in self.model.blocks:
            a = blk.attn2
            ks.append(a.norm_k(a.to_k(ctx)).unflatten(2, (self.heads, -1)))
            vs.append(a.to_v(ctx).unflatten(2, (self.heads, -1)))
        return PromptContext(ks, vs)

    # -- once per pass --------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, latents, timestep, prompt: PromptContext, cache: KVCache, rope, step: int):
        """Velocity for one chunk. latents [B, C, f, H, W]; timestep [B] (0..1000)."""
        B, _, f, H, W = latents.shape
        pt, ph, pw = self.patch
        grid = TokenGrid(f // pt, H // ph, W // pw)
        m = self.model

        x = m.patch_embedding(latents).flatten(2).transpose(1, 2).contiguous()
        e = m.condition_embedder.timesteps_proj(timestep)
        e = e.to(next(m.condition_embedder.time_embedder.parameters()).dtype)
        temb = m.condition_embedder.time_embedder(e).type_as(x)
        e6 = m.condition_embedder.time_proj(m.condition_embedder.act_fn(temb)).unflatten(1, (6, -1))

        layers = range(self.layers) if self.run_block == self.block else self.layer_ids
        for i, blk in enumerate(m.blocks):
            x = self.run_block(layers[i], blk, x, e6, prompt.k[i], prompt.v[i], cache.layer(i), rope, step, grid)

        shift, scale = (m.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        x = (m.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        x = m.proj_out(x)
        x = x.reshape(B, grid.frames, grid.height, grid.width, pt, ph, pw, -1)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def block(self, i, blk, x, e6, ctx_k, ctx_v, kv: LayerKV, rope, step, grid):
        """One transformer block. `i` and `step` are ints when eager, device tensors when compiled (one
        compiled block then serves every layer and every pass)."""
        bends = self.bends
        shift, scale, gate, c_shift, c_scale, c_gate = (blk.scale_shift_table + e6.float()).chunk(6, dim=1)

        h = (blk.norm1(x.float()) * (1 + scale) + shift).type_as(x)
        a = self.self_attention(i, blk.attn1, h, kv, rope, step, grid)
        x = (x.float() + a * gate).type_as(x)

        h = blk.norm2(x.float()).type_as(x)
        x = x + self.cross_attention(i, blk.attn2, h, ctx_k, ctx_v, step, grid)

        h = (blk.norm3(x.float()) * (1 + c_scale) + c_shift).type_as(x)
        ffn = blk.ffn.net
        hidden = bends.ffn_hidden(i, step, ffn[0](h))  # after the GELU: the FFN's neurons
        f = bends.ffn_out(i, step, ffn[2](hidden), grid)
        x = (x.float() + f.float() * c_gate).type_as(x)
        return bends.hidden(i, step, x, grid)

    def self_attention(self, i, attn, h, kv: LayerKV, rope, step, grid):
        q = attn.norm_q(attn.to_q(h)).unflatten(2, (self.heads, -1))
        k = attn.norm_k(attn.to_k(h)).unflatten(2, (self.heads, -1))
        v = attn.to_v(h).unflatten(2, (self.heads, -1))
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q = self.bends.self_query(i, step, q)
        keys, values = kv.write_and_read(k, v)
        self.bends.self_keys(i, step, q, keys)
        mask = None if kv.mask is None else kv.mask[None, None, None, : keys.shape[2]]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.to(q.dtype), values.to(q.dtype),
                                             attn_mask=mask)
        out = self.bends.self_heads(i, step, out.transpose(1, 2), grid)
        out = attn.to_out[0](out.flatten(2, 3).type_as(h))
        return self.bends.self_out(i, step, out, grid)

    def cross_attention(self, i, attn, h, k, v, step, grid):
        q = attn.norm_q(attn.to_q(h)).unflatten(2, (self.heads, -1))
        out = self.bends.cross_attention(i, step, q, k, v, grid)
        return attn.to_out[0](out.flatten(2, 3).type_as(h))
