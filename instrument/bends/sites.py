"""Where bends reach into the DiT: one method per site, called from instrument/engine/dit.py.

With nothing armed at a site (the common case, decided when a patch is loaded, never by a knob) each
method returns its input object untouched, so the unbent stream runs exactly diffusers' arithmetic.
"""

from __future__ import annotations

import torch.nn.functional as F


class BendSites:
    """The armed bends of the running patch, grouped by site."""

    def __init__(self, bends=()):
        self.bends = list(bends)
        self.by_site: dict[str, list] = {}
        for b in self.bends:
            self.by_site.setdefault(b.site, []).append(b)

    @classmethod
    def empty(cls) -> "BendSites":
        return cls(())

    def load_values(self, params, prompt) -> None:
        """Copy the live values (and the prompt's token positions) into the bends' device tensors."""
        for b in self.bends:
            b.load_values(params, prompt)

    def _apply(self, site, layer, step, x, *extra):
        for b in self.by_site.get(site, ()):
            x = b.apply(layer, step, x, *extra)
        return x

    # self-attention
    def self_query(self, layer, step, q):
        return self._apply("self.query", layer, step, q)

    def self_heads(self, layer, step, out, grid):
        return self._apply("self.heads", layer, step, out, grid)

    def self_out(self, layer, step, out, grid):
        return self._apply("self.out", layer, step, out, grid)

    # cross-attention
    def cross_attention(self, layer, step, q, k, v, grid):
        bends = self.by_site.get("cross", ())
        if not bends:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return out.transpose(1, 2)
        raise NotImplementedError

    # feed-forward
    def ffn_hidden(self, layer, step, h):
        return self._apply("ffn.hidden", layer, step, h)

    def ffn_out(self, layer, step, f, grid):
        return self._apply("ffn.out", layer, step, f, grid)

    # residual stream
    def hidden(self, layer, step, x, grid):
        return self._apply("hidden", layer, step, x, grid)
