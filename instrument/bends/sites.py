"""Where bends reach into the DiT: one method per site, called from instrument/engine/dit.py.

With nothing armed at a site (decided when a patch is loaded, never by a knob) each method returns its
input untouched, so the unbent stream runs diffusers' arithmetic (cross-attention adds a zero logit bias,
so that armed and unarmed run the same kernel). Probes (instrument/bends/probe.py)
read the same sites and cost nothing when none is armed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sdpa(q, k, v, bias=None):
    """Attention on diffusers' [B, N, heads, D] layout; `bias` [T] is added to every row's logits."""
    mask = None if bias is None else bias.to(q.dtype).view(1, 1, 1, -1)
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=mask).transpose(1, 2)


class BendSites:
    """The armed bends (and probes) of the running patch, grouped by site."""

    def __init__(self, bends=(), probes=()):
        self.bends = list(bends)
        self.probes = list(probes)
        self.by_site: dict[str, list] = {}
        for b in self.bends:
            self.by_site.setdefault(b.site, []).append(b)
        self.probe_at: dict[str, list] = {}
        for p in self.probes:
            self.probe_at.setdefault(p.site, []).append(p)

    @classmethod
    def empty(cls) -> "BendSites":
        return cls(())

    def load_values(self, params, prompt, grid) -> None:
        """Copy the live values (and the prompt's token positions) into the bends' device tensors."""
        for b in self.bends:
            b.load_values(params, prompt, grid)
        for p in self.probes:
            p.load_values(prompt, grid)

    def take_bad(self) -> dict[str, float]:
        """Non-finite values caught per bend since the last call (reads the device: call after a chunk)."""
        out = {}
        for b in self.bends:
            n = float(b.bad)
            if n:
                out[b.name] = n
                b.bad.zero_()
        return out

    def _apply(self, site, layer, step, x, *extra):
        for b in self.by_site.get(site, ()):
            x = b.apply(layer, step, x, *extra)
        for p in self.probe_at.get(site, ()):
            p.record(layer, step, x, *extra)
        return x

    # -- self-attention -------------------------------------------------------------------------
    def self_query(self, layer, step, q):
        return self._apply("self.query", layer, step, q)

    def self_keys(self, layer, step, q, keys):
        """Probes only: the queries and every key they attend to ([B, N, H, D], [B, H, M, D])."""
        for p in self.probe_at.get("self.keys", ()):
            p.record(layer, step, q, keys)

    def self_heads(self, layer, step, out, grid):
        return self._apply("self.heads", layer, step, out, grid)

    def self_out(self, layer, step, out, grid):
        return self._apply("self.out", layer, step, out, grid)

    # -- cross-attention ------------------------------------------------------------------------
    def cross_attention(self, layer, step, q, k, v, grid):
        bends = self.by_site.get("cross", ())
        probes = self.probe_at.get("cross", ())
        # One fused call, armed or not, always with a logit bias over the prompt tokens (zeros when nothing
        # is armed). Token gains are that bias, value swaps new value rows, and a silent bend (mix 0, or a
        # layer or step it does not target) leaves both exactly as they were: the same kernel on the same
        # inputs gives the unbent output bit for bit, with no second attention call to select from
        # (BENCHMARKS round 9: that second call cost 9.5 ms a chunk at 832x480).
        v2, bias = v, k.new_zeros(k.shape[1], dtype=torch.float32)
        for b in bends:
            v2 = b.bend_values(layer, step, v2)
            bias = b.logit_bias(layer, step, bias)
        out = sdpa(q, k, v2, bias)
        maps = [b for b in bends if b.needs_probs]
        if not maps and not probes:
            return out
        # Probabilities only where needed: the log-normaliser of every row, then the few chosen
        # columns. Bending columns S of P (and renormalising) changes the output by
        # sum_S (P'_s - P_s) v_s, divided by the new row sum 1 + sum_S (P'_s - P_s).
        logits = torch.einsum("bnhd,bthd->bhnt", q, k).to(torch.promote_types(q.dtype, torch.float32))
        logits = logits * q.shape[-1] ** -0.5 + bias
        lse = logits.logsumexp(dim=-1, keepdim=True)
        if probes:
            p = (logits - lse).exp()
            for pr in probes:
                pr.record(layer, step, p, grid)
        if not maps:
            return out
        num = out.transpose(1, 2).to(logits.dtype)  # [B, heads, N, D]
        z = torch.ones_like(lse)
        for b in maps:
            cols = (logits.index_select(-1, b.slot_index) - lse).exp()  # [B, heads, N, K]
            delta = b.bend_columns(layer, step, cols, grid) - cols
            num = num + delta @ v2.index_select(1, b.slot_index).transpose(1, 2).to(delta.dtype)
            if b.option["renormalise"]:
                z = z + delta.sum(dim=-1, keepdim=True)
        bent = (num / z.clamp_min(1e-6)).transpose(1, 2).to(out.dtype)
        # the recombination is exact only in exact arithmetic: silent map bends keep the fused output
        active = torch.stack([b.active(layer, step) for b in maps]).any()
        return torch.where(active, bent, out)

    # -- feed-forward ---------------------------------------------------------------------------
    def ffn_hidden(self, layer, step, h):
        return self._apply("ffn.hidden", layer, step, h)

    def ffn_out(self, layer, step, f, grid):
        return self._apply("ffn.out", layer, step, f, grid)

    # -- residual stream ------------------------------------------------------------------------
    def hidden(self, layer, step, x, grid):
        return self._apply("hidden", layer, step, x, grid)
