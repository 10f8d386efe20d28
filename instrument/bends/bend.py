"""The bends: one class per operation, each bound to one site of the DiT.

A bend is built once from its patch entry (structure: which op, which site, target specs, padding)
and from then on is pure data: its knobs, its mix and its target weights live in device tensors that
`load_values` rewrites in place once per chunk. Nothing a knob does changes a shape, a code path or an
address, so a compiled, graph-captured stream keeps running while knobs move.

Every bend's effect is `mix(x, bent, w)` with w = mix x layer weight x step weight x unit weights
(heads, tokens, neurons or channels) x spatial weights (frames of the chunk, a feathered region):
where w is 0 the tensor passes bit-identical, so mix 0 is exactly the unbent stream.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import math

import torch

from ..params import ParamSpec
from . import ops
from .targets import TargetError, parse_box, parse_indices, target_weights

Tensor = torch.Tensor


# A continuous parameter of an operation, named by its short name ("temperature"); in the parameter
# space it becomes "bend/<bend>/<knob>".
Knob = ParamSpec


@dataclass(frozen=True)
class Dims:
    """What the targets count: read from the loaded transformer's config, never assumed."""

    layers: int
    heads: int
    dim: int
    ffn: int
    text_len: int
    steps: int = 4


MAX_FRAMES = 16  # latent frames in a chunk, at most
MIX = Knob("mix", 0.0, 1.0, 1.0, "", "0 leaves the stream exactly as unbent, 1 is the full bend")
GEOMETRY = (
    Knob("scale", 0.25, 4.0, 1.0, "x", "zoom about the centre (>1 zooms in)"),
    Knob("degrees", -180.0, 180.0, 0.0, "deg", "rotation, counter-clockwise"),
    Knob("dx", -1.0, 1.0, 0.0, "width", "move right by a fraction of the width"),
    Knob("dy", -1.0, 1.0, 0.0, "height", "move down by a fraction of the height"),
    Knob("flip_h", 0.0, 1.0, 0.0, "", "mirror left-right (between 0 and 1 folds through zero width)"),
    Knob("flip_v", 0.0, 1.0, 0.0, "", "mirror top-bottom"),
)
BLUR = Knob("blur", 0.0, 4.0, 0.0, "px", "gaussian blur sigma, in latent-grid cells")
REGION = (
    Knob("x0", 0.0, 1.0, 0.0, "width", "region box left"),
    Knob("y0", 0.0, 1.0, 0.0, "height", "region box top"),
    Knob("x1", 0.0, 1.0, 1.0, "width", "region box right"),
    Knob("y1", 0.0, 1.0, 1.0, "height", "region box bottom"),
    Knob("feather", 0.0, 1.0, 0.05, "", "soft edge width of the region"),
    Knob("inside", 0.0, 1.0, 1.0, "", "1 bends inside the box, 0 outside"),
)


class Bend:
    """Base: a named bend at one site with its knobs and its targets."""

    op: str = ""
    site: str = ""
    doc: str = ""
    knobs: tuple[Knob, ...] = ()
    units: str | None = None  # "heads", "tokens", "neurons" or "channels": what its unit target counts
    spatial: bool = False  # accepts frames / region targets
    options: dict = {}  # structural options with defaults (strings, bools, ints)

    def __init__(self, name: str, spec: dict, dims: Dims, device, activations=None):
        self.name = name
        self.dims = dims
        self.device = torch.device(device)
        self.option = {k: spec.get(k, v) for k, v in self.options.items()}
        self.region = spec.get("region") is not None
        self.all_knobs = (MIX, *self.knobs, *(REGION if self.region else ()))
        self.values = torch.tensor([k.default for k in self.all_knobs], dtype=torch.float32, device=self.device)
        for i, k in enumerate(self.all_knobs):
            if k.name in spec:
                self.values[i] = float(spec[k.name])
        if self.region:
            box = parse_box(spec["region"])
            for j, name in enumerate(("x0", "y0", "x1", "y1")):
                self.values[self._index(name)] = float(box[j])
        self.initial = self.values.clone()  # the patch's own values, restored when it is armed again
        self._host = self.values.cpu().pin_memory() if self.device.type == "cuda" else self.values.clone()
        self.layer_w = target_weights(layer_spec(spec.get("layers", "all"), dims.layers), dims.layers, what="layer",
                                      device=self.device)
        self.step_w = step_weights(spec.get("steps", "all"), dims.steps, self.device)
        self.frame_all = target_weights(spec.get("frames", "all"), MAX_FRAMES, what="frame")
        self.frame_w: Tensor | None = None  # sized when the stream's grid is known
        self.unit_spec = spec.get(self.units, "all") if self.units else None
        self.unit_w = None
        if self.units in ("heads", "neurons", "channels"):
            n = {"heads": dims.heads, "neurons": dims.ffn, "channels": dims.dim}[self.units]
            acts = (activations or {}).get(self.units)  # [units, features] for 'cluster k of n'
            self.unit_w = target_weights(self.unit_spec, n, what=self.units[:-1], activations=acts,
                                         device=self.device)
        elif self.units == "tokens":
            self.unit_w = torch.zeros(dims.text_len, device=self.device)
            self._token_key = None
        self.bad = torch.zeros((), device=self.device)  # non-finite values caught at this bend's site

    # -- structure ----------------------------------------------------------------------------
    def rearm(self) -> None:
        """Back to the patch's values (a patch played again starts as written)."""
        self.values.copy_(self.initial)
        self._host.copy_(self.initial)
        self.bad.zero_()

    def specs(self) -> list[ParamSpec]:
        return [replace(k, name=f"bend/{self.name}/{k.name}", default=float(self.values[i]))
                for i, k in enumerate(self.all_knobs)]

    def _index(self, knob: str) -> int:
        return next(i for i, k in enumerate(self.all_knobs) if k.name == knob)

    def k(self, knob: str) -> Tensor:
        """A knob's live value as a 0-d device tensor (a view: never a copy, never a sync)."""
        return self.values[self._index(knob)]

    # -- once per chunk, outside the compiled region ------------------------------------------
    def load_values(self, params, prompt, grid) -> None:
        for i, k in enumerate(self.all_knobs):
            name = f"bend/{self.name}/{k.name}"
            if name in params:
                self._host[i] = params.get(name)
        self.values.copy_(self._host, non_blocking=True)
        if self.units == "tokens":
            self._load_tokens(prompt)
        if self.spatial and (self.frame_w is None or self.frame_w.numel() != grid.frames):
            # Frames past the chunk's length target nothing (a 1-frame chunk has only frame 0).
            self.frame_w = self.frame_all[: grid.frames].to(self.device)

    def _load_tokens(self, prompt) -> None:
        key = (prompt.text, prompt.length)
        if key == self._token_key:
            return
        w = token_weights(self.unit_spec, prompt, self.dims.text_len)
        self.unit_w.copy_(w.to(self.device), non_blocking=True)
        self._token_key = key

    # -- inside the compiled region -----------------------------------------------------------
    def gate(self, layer: int, step: int) -> Tensor:
        """mix x layer weight x step weight x acting: the bend's overall strength at this pass (0-d)."""
        return self.values[0] * pick(self.layer_w, layer) * pick(self.step_w, step) * self.acting()

    def acting(self) -> Tensor:
        """1 unless the knobs sit at a neutral setting whose arithmetic is not exactly the identity."""
        return self.values.new_ones(())

    def spatial_weights(self, grid, like: Tensor) -> Tensor:
        """[F, H, W]: frames of the chunk times the feathered region (1 everywhere without targets)."""
        w = self.frame_w.to(like.dtype).view(-1, 1, 1).expand(grid.frames, grid.height, grid.width)
        if self.region:
            box = torch.stack([self.k("x0"), self.k("y0"), self.k("x1"), self.k("y1")])
            w = w * ops.region_mask(grid.height, grid.width, box, self.k("feather"), self.k("inside"), like)
        return w

    def finish(self, x: Tensor, bent: Tensor, w: Tensor) -> Tensor:
        """Mix in the bend where w > 0, with non-finite values caught here rather than in the cache."""
        bad = (~torch.isfinite(bent)) & (w != 0)  # what a silent bend computes does not count
        self.bad += bad.sum(dtype=torch.float32)
        return ops.mix(x, torch.nan_to_num(bent, nan=0.0, posinf=0.0, neginf=0.0), w)

    def apply(self, layer, step, x, *extra):
        raise NotImplementedError


LAYER_WORDS = ("early", "middle", "late")


def layer_spec(spec, layers: int):
    """Layer specs may name thirds of the model ('early', 'middle', 'late'), so one patch plays on the
    embedded model, Wan 1.3B (30 layers) and 14B (40) alike."""
    terms = spec if isinstance(spec, (list, tuple)) else [spec]
    out = []
    for term in terms:
        for t in (term.split(",") if isinstance(term, str) else [term]):
            word = t.strip().lower() if isinstance(t, str) else None
            if word in LAYER_WORDS:
                third = LAYER_WORDS.index(word)
                lo, hi = math.floor(layers * third / 3), math.ceil(layers * (third + 1) / 3)
                out.append(f"{lo}-{max(lo, hi - 1)}")
            else:
                out.append(t)
    return out


def pick(vec: Tensor, i) -> Tensor:
    """vec[i] for an int, or for a [1] index tensor on the device (compiled passes) without a host sync:
    indexing with a device scalar would read it back to the host, which breaks CUDA graph capture."""
    if isinstance(i, int):
        return vec[i]
    return vec.index_select(0, i).squeeze(0)


def step_weights(spec, steps: int, device) -> Tensor:
    """[steps + 1]: the denoising steps, then the clean context pass (index -1, 'context')."""
    w = torch.zeros(steps + 1)
    terms = spec if isinstance(spec, (list, tuple)) else [spec] if isinstance(spec, int) else str(spec).split(",")
    rest = []
    for t in terms:
        if isinstance(t, str) and t.strip().lower() == "context":
            w[steps] = 1
        elif isinstance(t, str) and t.strip().lower() == "all":
            w[:] = 1
        else:
            rest.append(t)
    if rest:
        for i in parse_indices(rest, steps, what="step"):
            w[i] = 1
    return w.to(device)


def token_weights(spec, prompt, text_len: int) -> Tensor:
    """Token weights [text_len] from words of the prompt ('red, fox'), positions ('#3-5') or 'all'.

    A word absent from the current prompt targets nothing (the bend waits for a prompt that has it).
    """
    w = torch.zeros(text_len)
    terms = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
    for term in terms:
        t = str(term).strip()
        if not t:
            continue
        if t.lower() == "all":
            w[: prompt.length] = 1
        elif t.startswith("#"):
            for i in parse_indices(t[1:], text_len, what="token"):
                w[i] = 1
        else:
            for p in prompt.positions(t):
                w[p] = 1
    return w


# == self-attention ===============================================================================
class SelfTemperature(Bend):
    op, site, units = "self.temperature", "self.query", "heads"
    doc = "Attention temperature per head: below 1 sharpens (each token attends to fewer), above 1 melts."
    knobs = (Knob("temperature", 0.1, 4.0, 1.0, "", "softmax temperature of the chosen heads"),)

    def apply(self, layer, step, q):
        # Scaling the queries scales the logits: mixing the factor (not the output) keeps one SDPA call.
        w = (self.gate(layer, step) * self.unit_w).view(1, 1, -1, 1)
        factor = 1.0 + w * (1.0 / self.k("temperature") - 1.0)
        return q * factor.to(q.dtype)


class SelfGain(Bend):
    op, site, units = "self.gain", "self.heads", "heads"
    doc = "Gain on the chosen heads' attention output, before the output projection."
    knobs = (Knob("gain", 0.0, 4.0, 1.0, "x", "output gain of the chosen heads"),)

    def apply(self, layer, step, out, grid):
        w = (self.gate(layer, step) * self.unit_w).view(1, 1, -1, 1)
        return out * (1.0 + w * (self.k("gain") - 1.0)).to(out.dtype)


class SelfAblate(Bend):
    op, site, units = "self.ablate", "self.heads", "heads"
    doc = "Silence the chosen heads (mix fades them out)."

    def apply(self, layer, step, out, grid):
        w = (self.gate(layer, step) * self.unit_w).view(1, 1, -1, 1)
        return out * (1.0 - w).to(out.dtype)


class SelfTransform(Bend):
    op, site, spatial = "self.transform", "self.out", True
    doc = "Zoom, rotate, move, flip and blur the self-attention output laid out as frames x height x width."
    knobs = (*GEOMETRY, BLUR)
    options = {"padding": "border"}

    def acting(self):
        return moving(self)

    def apply(self, layer, step, out, grid):
        maps = ops.tokens_to_maps(out, grid.frames, grid.height, grid.width)
        bent = warp_and_blur(self, maps)
        w = self.gate(layer, step) * self.spatial_weights(grid, maps)
        return ops.maps_to_tokens(self.finish(maps, bent, w))


NEUTRAL = {"scale": 1.0, "degrees": 0.0, "dx": 0.0, "dy": 0.0, "flip_h": 0.0, "flip_v": 0.0, "blur": 0.0,
           "amplify": 1.0, "sharpen": 0.0}


def moving(bend: Bend) -> Tensor:
    """1 when any image knob is off its neutral value, else 0. At neutral the resample (not exactly the
    identity in floating point) is mixed out, so neutral knobs give the unbent stream bit for bit."""
    off = [bend.k(k.name) != NEUTRAL[k.name] for k in bend.knobs if k.name in NEUTRAL]
    return torch.stack(off).any().to(bend.values.dtype)


def warp_and_blur(bend: Bend, maps: Tensor) -> Tensor:
    pad = bend.option["padding"]
    bent = ops.transform(maps, scale=bend.k("scale"), degrees=bend.k("degrees"), dx=bend.k("dx"),
                         dy=bend.k("dy"), flip_h=bend.k("flip_h"), flip_v=bend.k("flip_v"), padding=pad)
    return ops.blur(bent, bend.k("blur"), radius=4, padding=pad)


# == cross-attention ==============================================================================
class CrossBend(Bend):
    site, units = "cross", "tokens"

    def active(self, layer, step) -> Tensor:
        """Whether this bend changes anything at this pass (0-d bool, on the device)."""
        return self.gate(layer, step) > 0

    needs_probs = False  # True for bends that reshape attention probabilities (they define bend_columns)

    def bend_values(self, layer, step, v):
        return v

    def logit_bias(self, layer, step, bias):
        return bias



class CrossGain(CrossBend):
    op = "cross.gain"
    doc = "Reweight the chosen prompt tokens' attention (with renormalising by default)."
    knobs = (Knob("gain", 0.0, 8.0, 2.0, "x", "attention gain of the chosen tokens"),)
    options = {"renormalise": True}

    def acting(self):  # gain 1 changes nothing, but renormalising is not exactly the identity
        return (self.k("gain") != 1.0).to(self.values.dtype)

    def _factor(self, layer, step):
        w = self.gate(layer, step) * self.unit_w  # [T]
        return 1.0 + w * (self.k("gain") - 1.0)

    # Multiplying a token's probability by g and renormalising is adding log g to its logit; without
    # renormalising it is scaling its value row by g. Either way fused attention does the work.
    def logit_bias(self, layer, step, bias):
        if not self.option["renormalise"]:
            return bias
        b = self._factor(layer, step).clamp_min(1e-6).log()
        return b if bias is None else bias + b

    def bend_values(self, layer, step, v):
        if self.option["renormalise"]:
            return v
        return v * self._factor(layer, step).view(1, -1, 1, 1).to(v.dtype)


class CrossMap(CrossBend):
    op = "cross.map"
    doc = ("AttentionBender: warp the chosen tokens' attention maps as images (amplify, zoom, rotate, move, "
           "flip, blur, sharpen, regional mask).")
    knobs = (Knob("amplify", 0.0, 8.0, 1.0, "x", "gain on the map"), *GEOMETRY, BLUR,
             Knob("sharpen", 0.0, 4.0, 0.0, "", "unsharp-mask amount"))
    options = {"padding": "zeros", "renormalise": True, "max_tokens": 8}
    spatial = True
    needs_probs = True

    def acting(self):
        return torch.maximum(moving(self), torch.full((), float(self.region), device=self.values.device))

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        # The chosen tokens are gathered into a fixed number of slots, so only their maps are warped;
        # unused slots point at the last text positions (zero padding) with weight 0.
        n = int(self.option["max_tokens"])
        self.slot_index = torch.arange(self.dims.text_len - n, self.dims.text_len, device=self.device)
        self.slot_w = torch.zeros(n, device=self.device)

    def _load_tokens(self, prompt):
        key = (prompt.text, prompt.length)
        if key == self._token_key:
            return
        super()._load_tokens(prompt)
        n = self.slot_w.numel()
        chosen = torch.nonzero(token_weights(self.unit_spec, prompt, self.dims.text_len)).flatten()[:n]
        index = torch.arange(self.dims.text_len - n, self.dims.text_len)
        weight = torch.zeros(n)
        index[: chosen.numel()] = chosen
        weight[: chosen.numel()] = 1
        self.slot_index.copy_(index.to(self.device), non_blocking=True)
        self.slot_w.copy_(weight.to(self.device), non_blocking=True)

    def bend_columns(self, layer, step, cols, grid):
        """The chosen tokens' probabilities [B, heads, N, K] (one map per slot) -> their bent values."""
        maps = ops.attn_to_maps(cols, grid.frames, grid.height, grid.width)  # [B, heads, K, F, H, W]
        bent = ops.amplify(warp_and_blur(self, maps), self.k("amplify"))
        bent = ops.sharpen(bent, self.k("sharpen"), padding="border")
        if self.region:
            box = torch.stack([self.k("x0"), self.k("y0"), self.k("x1"), self.k("y1")])
            bent = ops.region(bent, box, self.k("feather"), self.k("inside"))
        w = self.gate(layer, step) * self.slot_w.view(-1, 1, 1, 1) * self.frame_w.view(1, -1, 1, 1)
        new = ops.maps_to_attn(self.finish(maps, bent, w.to(maps.dtype)))
        # renormalising needs probabilities: negative values (sharpening overshoots) become 0 first
        return new.clamp_min(0) if self.option["renormalise"] else new


class CrossSwap(CrossBend):
    op = "cross.swap"
    doc = "Blend the chosen tokens' value vectors towards another word's ('with'): say fox, mean cat."
    knobs = (Knob("amount", 0.0, 1.0, 1.0, "", "0 keeps each token's value, 1 replaces it"),)
    options = {"with": ""}

    def acting(self):
        return (self.k("amount") != 0.0).to(self.values.dtype)

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        if not str(self.option["with"]).strip():
            raise TargetError(f"bend '{self.name}': cross.swap needs with = \"<word>\" (the token to swap in)")
        self.with_w = torch.zeros(self.dims.text_len, device=self.device)

    def _load_tokens(self, prompt):
        key = (prompt.text, prompt.length)
        if key == self._token_key:
            return
        super()._load_tokens(prompt)
        w = token_weights(self.option["with"], prompt, self.dims.text_len)
        self.with_w.copy_((w / w.sum().clamp_min(1)).to(self.device), non_blocking=True)

    def bend_values(self, layer, step, v):
        other = torch.einsum("t,bthd->bhd", self.with_w.to(v.dtype), v).unsqueeze(1)
        w = (self.gate(layer, step) * self.k("amount") * self.unit_w).view(1, -1, 1, 1)
        return ops.mix(v, other.expand_as(v), w.to(v.dtype))


# == feed-forward =================================================================================
class FfnNeurons(Bend):
    site, units = "ffn.hidden", "neurons"

    def apply(self, layer, step, h):
        w = self.gate(layer, step) * self.unit_w
        return self.finish(h, self.neurons(h), w.to(h.dtype))


class FfnAffine(FfnNeurons):
    """Neuron bends that are a scale and a shift (knobs bounded by their ranges, so a finite activation
    stays finite): no NaN guard over the 8,960-wide hidden state, and the multiply-add fuses into the
    GELU's kernel (BENCHMARKS round 9: guarded, ffn.gain doubled that kernel's time)."""

    def scale_shift(self) -> tuple:
        raise NotImplementedError

    def apply(self, layer, step, h):
        return ops.scale_shift(h, self.gate(layer, step) * self.unit_w, *self.scale_shift())


class FfnGain(FfnAffine):
    op, doc = "ffn.gain", "Gain on the chosen FFN neurons (after the GELU)."
    knobs = (Knob("gain", -4.0, 4.0, 2.0, "x", "neuron gain"),)

    def scale_shift(self):
        return self.k("gain"), None


class FfnOffset(FfnAffine):
    op, doc = "ffn.offset", "Add an offset to the chosen FFN neurons."
    knobs = (Knob("offset", -4.0, 4.0, 0.5, "", "added to each chosen neuron"),)

    def scale_shift(self):
        return 1.0, self.k("offset")


class FfnInvert(FfnAffine):
    op, doc = "ffn.invert", "Negate the chosen FFN neurons."

    def scale_shift(self):
        return -1.0, None


class FfnAblate(FfnAffine):
    op, doc = "ffn.ablate", "Silence the chosen FFN neurons."

    def scale_shift(self):
        return 0.0, None


class FfnThreshold(FfnNeurons):
    op, doc = "ffn.threshold", "Keep the chosen neurons only where they exceed a threshold."
    knobs = (Knob("threshold", -1.0, 4.0, 0.5, "", "activations below this become 0"),)

    def neurons(self, h):
        return torch.where(h > self.k("threshold").to(h.dtype), h, torch.zeros_like(h))


class FfnNoise(FfnNeurons):
    op, doc = "ffn.noise", "Add seeded gaussian noise to the chosen neurons, new every chunk."
    knobs = (Knob("amount", 0.0, 4.0, 0.5, "", "noise standard deviation"),)
    options = {"seed": 0}

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.noise = None
        self._fresh = False

    def rearm(self) -> None:
        super().rearm()
        if self.noise is not None:  # the same noise sequence as when the patch was first armed
            self.noise.reseed(int(self.option["seed"]))
            self._fresh = True

    def load_values(self, params, prompt, grid):
        super().load_values(params, prompt, grid)
        if self.noise is None or self.noise.buffer.shape[1] != grid.tokens:
            self.noise = ops.NoiseSource((1, grid.tokens, self.dims.ffn), int(self.option["seed"]), self.device)
        elif not self._fresh:
            self.noise.refresh()
        self._fresh = False

    def neurons(self, h):
        return h + self.k("amount").to(h.dtype) * self.noise.buffer.to(h.dtype)


class FfnScale(Bend):
    op, site, spatial = "ffn.scale", "ffn.out", True
    doc = "Scale the whole FFN output of the chosen layers (Real-Time AttentionBender's FFN trace)."
    knobs = (Knob("scale", 0.0, 4.0, 1.5, "x", "FFN output scale"),)

    def apply(self, layer, step, f, grid):  # a scale of bounded range, as FfnAffine: no guard needed
        return ops.scale_shift(f, self.gate(layer, step) * self.spatial_weights(grid, f).reshape(1, -1, 1),
                               self.k("scale"))


# == residual stream (Network Bending's layer operations) ========================================
class HiddenBend(Bend):
    site, units, spatial = "hidden", "channels", True

    def apply(self, layer, step, x, grid):
        g = ops.tokens_to_grid(x, grid.frames, grid.height, grid.width)
        sw = self.spatial_weights(grid, g).unsqueeze(-1)  # [F, H, W, 1]
        w = self.gate(layer, step) * sw * self.unit_w.to(g.dtype)
        return ops.grid_to_tokens(self.finish(g, self.bend_grid(g), w.to(g.dtype)))


class HiddenAblate(HiddenBend):
    op, doc = "hidden.ablate", "Zero the chosen channels of the residual stream after a block."

    def bend_grid(self, g):
        return torch.zeros_like(g)


class HiddenInvert(HiddenBend):
    op, doc = "hidden.invert", "Reflect the chosen channels about their mean (2 x mean - x)."

    def bend_grid(self, g):
        mean = g.mean(dim=(1, 2, 3), keepdim=True)
        return 2 * mean - g


class HiddenScale(HiddenBend):
    op, doc = "hidden.scale", "Multiply the chosen channels by a scalar."
    knobs = (Knob("factor", -4.0, 4.0, 2.0, "x", "scalar multiplier"),)

    def bend_grid(self, g):
        return g * self.k("factor").to(g.dtype)


class HiddenThreshold(HiddenBend):
    op, doc = "hidden.threshold", "Binary threshold of the chosen channels, in units of each channel's spread."
    knobs = (Knob("threshold", -3.0, 3.0, 0.0, "std", "threshold above the channel mean"),)

    def bend_grid(self, g):
        mean = g.mean(dim=(1, 2, 3), keepdim=True)
        std = g.std(dim=(1, 2, 3), keepdim=True)
        hi, lo = mean + std, mean - std
        return torch.where(g > mean + self.k("threshold").to(g.dtype) * std, hi, lo)


class HiddenWarp(HiddenBend):
    op, doc = "hidden.warp", "Translate, rotate, zoom and flip the chosen channels' feature maps."
    knobs = (*GEOMETRY, BLUR)
    options = {"padding": "border"}

    def acting(self):
        return moving(self)

    def bend_grid(self, g):
        return ops.maps_to_grid(warp_and_blur(self, ops.grid_to_maps(g)))


class HiddenErode(HiddenBend):
    op, doc = "hidden.erode", "Erode the chosen channels' feature maps (min filter)."
    options = {"size": 3, "iterations": 1}

    def bend_grid(self, g):
        maps = ops.erode(ops.grid_to_maps(g), size=int(self.option["size"]),
                         iterations=int(self.option["iterations"]))
        return ops.maps_to_grid(maps)


class HiddenDilate(HiddenErode):
    op, doc = "hidden.dilate", "Dilate the chosen channels' feature maps (max filter)."

    def bend_grid(self, g):
        maps = ops.dilate(ops.grid_to_maps(g), size=int(self.option["size"]),
                          iterations=int(self.option["iterations"]))
        return ops.maps_to_grid(maps)


OPS: dict[str, type[Bend]] = {cls.op: cls for cls in (
    SelfTemperature, SelfGain, SelfAblate, SelfTransform,
    CrossGain, CrossMap, CrossSwap,
    FfnGain, FfnOffset, FfnInvert, FfnAblate, FfnThreshold, FfnNoise, FfnScale,
    HiddenAblate, HiddenInvert, HiddenScale, HiddenThreshold, HiddenWarp, HiddenErode, HiddenDilate,
)}
# Network Bending's names for the geometric layer ops: one warp does them all (and in one resample).
for _alias in ("hidden.translate", "hidden.rotate", "hidden.zoom", "hidden.flip"):
    OPS[_alias] = HiddenWarp

TARGET_KEYS = ("layers", "steps", "frames", "region")

# Structural options: what each may hold (checked when a patch is read, so nothing fails on stage).
OPTION_CHECKS = {
    "padding": (lambda v: v in ops.PADDINGS, f"one of {', '.join(ops.PADDINGS)}"),
    "renormalise": (lambda v: isinstance(v, bool), "true or false"),
    "max_tokens": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 64, "an integer 1-64"),
    "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a non-negative integer"),
    "size": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v in (1, 3, 5, 7), "1, 3, 5 or 7"),
    "iterations": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 8, "an integer 1-8"),
    "with": (lambda v: isinstance(v, str) and v.strip() != "", "a word of the prompt, in quotes"),
}


def allowed_keys(cls: type[Bend]) -> set[str]:
    keys = {"name", "op", *TARGET_KEYS, MIX.name, *(k.name for k in cls.knobs), *cls.options}
    if cls.units:
        keys.add(cls.units)
    return keys
