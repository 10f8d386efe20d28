"""Patches from the running state, and morphs between two patches.

    text = patch_to_toml(current_patch(engine, stream, "after the solo"))  # save what is playing
    m = morph(engine, patch_a, patch_b)        # arms both patches' bends at once
    engine.params.set("patch/morph", 0.5)      # or OSC /patch/morph 0.5, or a mapped knob
    m.tick()                                   # once per render tick: writes the bend knobs

A saved patch is the state, not the file it came from: the armed bends' structure (op, targets,
options) with every knob and mix at its live value, the prompts, the seed and the prompt blend.
Knobs a [[bend]] table cannot hold (a region's live box, feather and inside) go to [params].
Knob values are saved as the engine holds them (float32, written in their shortest decimal form),
so loading the saved file gives the bends the same values bit for bit.

A morph arms the union of two patches' bends. A bend with the same name, op and targets in both
is one bend whose knobs interpolate; any other bend fades by its mix (A's out, B's in). The
parameter 'patch/morph' is 0 for exactly patch A's values and 1 for exactly patch B's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tomli_w

from ..params import ParamSpec, UnknownParam
from .bend import OPS, allowed_keys
from .patch import Patch, apply_patch

MORPH = "patch/morph"
BLEND = "prompt/blend"


# -- the state as a patch --------------------------------------------------------------------
def current_patch(engine, stream=None, name: str | None = None) -> Patch:
    """What is playing now as a Patch: armed bends with live knob values, prompts, seed, blend."""
    params = engine.params
    base: Patch | None = getattr(engine, "patch", None)
    values = params.values()
    bends, extra_params = [], {}
    for spec in (base.bends if base is not None else []):
        b = copy.deepcopy(spec)
        keys = allowed_keys(OPS[b["op"]])
        prefix = f"bend/{b['name']}/"
        for pname, v in values.items():
            if not pname.startswith(prefix):
                continue
            knob = pname[len(prefix):]
            v = engine_precision(v)
            if knob in keys:
                b[knob] = v
            else:  # region box, feather, inside: live knobs without a [[bend]] key
                extra_params[pname] = v
        bends.append(b)
    if base is not None:  # keep the patch's other initial values (modulator settings, ...)
        for pname, v in base.params.items():
            if not pname.startswith("bend/") and pname != BLEND:
                extra_params[pname] = values.get(pname, v)
    patch = Patch(name=name or (base.name if base is not None else "untitled"), bends=bends,
                  params=extra_params, extra=copy.deepcopy(base.extra) if base is not None else {})
    if stream is not None:
        a, b = stream.prompts
        patch.prompt = a.text if a is not None else None
        patch.prompt_b = b.text if b is not None else None
        patch.seed = int(stream.seed)
    elif base is not None:
        patch.prompt, patch.prompt_b, patch.seed = base.prompt, base.prompt_b, base.seed
    if BLEND in values:
        patch.blend = values[BLEND]
    return patch


def engine_precision(v: float) -> float:
    """A knob value as the bends hold it (float32 on the device), in its shortest decimal form."""
    return float(str(np.float32(v)))


def patch_to_toml(patch: Patch) -> str:
    """A patch as the TOML text `load_patch` reads back to the same state."""
    doc: dict = {"name": patch.name}
    for key in ("prompt", "prompt_b", "seed", "blend"):
        v = getattr(patch, key)
        if v is not None:
            doc[key] = v
    for key in ("mapping", "binding", "modulator"):
        if key in patch.extra:
            doc[key] = patch.extra[key]
    if patch.params:
        doc["params"] = dict(patch.params)
    if patch.bends:
        doc["bend"] = [_ordered(b) for b in patch.bends]
    return tomli_w.dumps(doc)


def _ordered(bend: dict) -> dict:
    # name and op first: that is how people read and write a [[bend]] table
    return {"name": bend["name"], "op": bend["op"], **{k: v for k, v in bend.items() if k not in ("name", "op")}}


def save_patch_file(patch: Patch, folder: str | Path) -> Path:
    """Write the patch as a new file in `folder` (name.toml, else name-2.toml, ...); never overwrites."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = "".join(c if c.isalnum() or c in "-_" else "-" for c in patch.name).strip("-") or "patch"
    text = patch_to_toml(patch)
    n = 1
    while True:
        path = folder / (f"{stem}.toml" if n == 1 else f"{stem}-{n}.toml")
        try:
            with open(path, "x", encoding="utf-8") as f:  # exclusive create: no race with another save
                f.write(text)
            return path
        except FileExistsError:
            n += 1


def patch_values(patch: Patch, dims) -> dict[str, float]:
    """The parameter values `apply_patch` would give: bend knobs (as the engine stores them) and blend."""
    out: dict[str, float] = {}
    specs: dict[str, ParamSpec] = {}
    for bend in patch.build(dims, "cpu"):
        for spec in bend.specs():
            specs[spec.name] = spec
            out[spec.name] = spec.default
    for name, v in patch.params.items():
        if name in specs and isinstance(v, (int, float)) and not isinstance(v, bool):
            out[name] = specs[name].clamp(v)
    if patch.blend is not None:
        out[BLEND] = float(patch.blend)
    return out


# -- morphs ----------------------------------------------------------------------------------
def _structure(bend: dict) -> dict:
    """A bend's settings other than its knob values: equal structure means one bend can morph."""
    knobs = {"mix", *(k.name for k in OPS[bend["op"]].knobs)}
    return {k: v for k, v in bend.items() if k not in knobs}


@dataclass
class Morph:
    """A union of two patches armed on an engine; 'patch/morph' moves from A (0) to B (1)."""

    engine: object
    a: Patch
    b: Patch
    union: Patch
    shared: set = field(default_factory=set)  # bend names that interpolate
    a_values: dict = field(default_factory=dict)  # union parameter name -> value in A
    b_values: dict = field(default_factory=dict)  # union parameter name -> value in B
    prompts: tuple[str, str] | None = None  # morph the prompt: A's text in slot 0, B's in slot 1
    _last: float | None = None

    def values(self, t: float) -> dict[str, float]:
        """Every parameter the morph drives, at position t (0..1)."""
        t = min(max(float(t), 0.0), 1.0)
        out = {}
        for name in self.a_values.keys() | self.b_values.keys():
            va, vb = self.a_values.get(name), self.b_values.get(name)
            if va is not None and vb is not None:
                out[name] = (1.0 - t) * va + t * vb  # exact A at 0 and exact B at 1
            elif name.endswith("/mix"):  # a bend of one patch only fades in or out
                out[name] = (1.0 - t) * va if va is not None else t * vb
            else:
                out[name] = va if va is not None else vb
        if self.prompts is not None:
            out[BLEND] = t
        return out

    def tick(self) -> bool:
        """Write the driven parameters if 'patch/morph' moved; False once the morph is gone."""
        params = self.engine.params
        try:
            t = params.get(MORPH)
        except UnknownParam:
            return False
        if t == self._last:
            return True
        self._last = t
        for name, v in self.values(t).items():
            try:
                params.set(name, v, source="morph")
            except UnknownParam:  # a switch removed it meanwhile: the morph is over
                return False
        return True


def plan_morph(a: Patch, b: Patch, dims) -> Morph:
    """The union patch and both end states, without touching an engine."""
    va, vb = patch_values(a, dims), patch_values(b, dims)
    union_bends = [copy.deepcopy(x) for x in a.bends]
    by_name = {x["name"]: x for x in a.bends}
    taken = set(by_name)
    shared, a_values, b_values = set(), {}, {}
    for name, v in va.items():
        if name != BLEND:
            a_values[name] = v
    for x in b.bends:
        other = by_name.get(x["name"])
        if other is not None and other["op"] == x["op"] and _structure(other) == _structure(x):
            shared.add(x["name"])
            new = x["name"]
        else:
            new = x["name"]
            n = 2
            while new in taken:
                new = f"{x['name']}-b" if n == 2 else f"{x['name']}-b{n}"
                n += 1
            taken.add(new)
            y = copy.deepcopy(x)
            y["name"] = new
            union_bends.append(y)
        prefix = f"bend/{x['name']}/"
        for pname, v in vb.items():
            if pname.startswith(prefix):
                b_values[f"bend/{new}/" + pname[len(prefix):]] = v
    prompts = None
    if a.prompt is not None and b.prompt is not None and a.prompt != b.prompt:
        prompts = (a.prompt, b.prompt)
    elif BLEND in va or BLEND in vb:
        if BLEND in va:
            a_values[BLEND] = va[BLEND]
        if BLEND in vb:
            b_values[BLEND] = vb[BLEND]
    union = Patch(name=f"{a.name} > {b.name}", prompt=a.prompt if prompts is None else prompts[0],
                  prompt_b=a.prompt_b if prompts is None else prompts[1], seed=a.seed, bends=union_bends,
                  params={}, extra=copy.deepcopy(a.extra), path=a.path)
    return Morph(None, a, b, union, shared, a_values, b_values, prompts)


def morph(engine, a: Patch, b: Patch, progress=None, at: float = 0.0) -> Morph:
    """Arm the union of two patches on the engine and declare 'patch/morph' (set to `at`)."""
    m = plan_morph(a, b, engine.dims)
    m.engine = engine
    apply_patch(engine, m.union, progress)
    engine.params.declare(ParamSpec(MORPH, 0.0, 1.0, 0.0, "", f"0 = patch '{a.name}', 1 = patch '{b.name}'"),
                          value=at)
    m.tick()
    return m
