"""Performance patches: TOML files that describe the bends of a moment of a performance.

    name = "melting fox"
    prompt = "a red fox running through snow"
    seed = 3

    [[bend]]
    name = "melt"              # its parameters become bend/melt/mix, bend/melt/temperature
    op = "self.temperature"
    layers = "10-20"
    heads = "0-5"
    temperature = 2.5
    mix = 1.0

Patches are data: read with tomllib, validated, never executed. `instrument check FILE` reports every
problem with its line and a hint; on stage a broken patch is refused with a message and the show goes
on with the patch it had.
"""

from __future__ import annotations

import difflib
import json
import re
import tomllib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from .bend import MAX_FRAMES, OPS, OPTION_CHECKS, Bend, Dims, allowed_keys, layer_spec, step_weights
from .targets import TargetError, parse_box, parse_indices

KEEP_BUILT = 4  # patches whose built bends are kept for an instant return (as many as captured graphs)
TOP_KEYS = {"name", "description", "prompt", "prompt_b", "blend", "seed", "bend", "mapping", "modulator",
            "binding", "params"}


@dataclass
class PatchProblem:
    line: int | None
    message: str
    hint: str = ""

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line else ""
        return where + self.message + (f" (hint: {self.hint})" if self.hint else "")


class PatchError(UserError):
    def __init__(self, path, problems: list[PatchProblem]):
        self.path, self.problems = path, problems
        super().__init__(f"{path}: " + "; ".join(str(p) for p in problems))


@dataclass
class Patch:
    name: str
    prompt: str | None = None
    prompt_b: str | None = None
    blend: float | None = None
    seed: int | None = None
    bends: list[dict] = field(default_factory=list)
    params: dict = field(default_factory=dict)  # initial values by parameter name
    extra: dict = field(default_factory=dict)  # mapping, binding, modulator tables (the control layer's)
    path: Path | None = None

    def build(self, dims: Dims, device, activations: dict | None = None) -> list[Bend]:
        return [OPS[b["op"]](b["name"], b, dims, device, activations) for b in self.bends]

    def uses_clusters(self) -> bool:
        return any("cluster" in str(b.get(k, "")) for b in self.bends for k in ("neurons", "channels"))


def _line_finder(text: str):
    lines = text.splitlines()
    bend_starts = [i + 1 for i, ln in enumerate(lines) if re.match(r"\s*\[\[\s*bend\s*\]\]", ln)]

    def find(key: str, bend: int | None = None) -> int | None:
        start = bend_starts[bend] if bend is not None and bend < len(bend_starts) else 1
        stop = bend_starts[bend + 1] if bend is not None and bend + 1 < len(bend_starts) else len(lines) + 1
        pat = re.compile(rf"\s*{re.escape(key)}\s*=")
        for n in range(start, stop):
            if pat.match(lines[n - 1]):
                return n
        return start if bend is not None else None

    return find


def parse_patch(text: str, path: str | Path = "<patch>", dims: Dims | None = None) -> Patch:
    """Parse and validate; raises PatchError listing every problem found."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"line (\d+)", str(e))
        raise PatchError(path, [PatchProblem(int(m[1]) if m else None, f"not valid TOML: {e}",
                                             "check quotes, brackets and '=' on that line")]) from None
    find = _line_finder(text)
    problems: list[PatchProblem] = []
    for key in data:
        if key not in TOP_KEYS:
            problems.append(PatchProblem(find(key), f"unknown key '{key}'", _suggest(key, TOP_KEYS)))
    patch = Patch(name=str(data.get("name", Path(str(path)).stem)), path=Path(str(path)))
    for key, typ in (("prompt", str), ("prompt_b", str), ("seed", int), ("blend", (int, float))):
        if key in data:
            if not isinstance(data[key], typ) or isinstance(data[key], bool):
                problems.append(PatchProblem(find(key), f"'{key}' has the wrong type ({type(data[key]).__name__})"))
            else:
                setattr(patch, key, data[key])
    if patch.blend is not None and not 0.0 <= patch.blend <= 1.0:
        problems.append(PatchProblem(find("blend"), f"blend {patch.blend} outside 0..1"))
    if isinstance(data.get("params", {}), dict):
        patch.params = {k: v for k, v in data.get("params", {}).items()}
    patch.extra = {k: data[k] for k in ("mapping", "binding", "modulator") if k in data}

    bends = data.get("bend", [])
    if not isinstance(bends, list):
        problems.append(PatchProblem(find("bend"), "'bend' must be a table array: write [[bend]]"))
        bends = []
    names = set()
    for i, b in enumerate(bends):
        problems.extend(_check_bend(i, b, names, find, dims))
        patch.bends.append(b)
    if problems:
        raise PatchError(path, problems)
    return patch


def _check_bend(i: int, b: dict, names: set, find, dims: Dims | None) -> list[PatchProblem]:
    out = []
    line = find("op", i)
    name = b.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_\-]+", name or ""):
        out.append(PatchProblem(find("name", i), f"bend #{i + 1} needs a name of letters, digits, '-' or '_'",
                                'name = "melt"'))
    elif name in names:
        out.append(PatchProblem(find("name", i), f"two bends are named '{name}'", "names must be unique"))
    else:
        names.add(name)
    op = b.get("op")
    cls = OPS.get(op) if isinstance(op, str) else None
    if cls is None:
        out.append(PatchProblem(line, f"bend '{name}': unknown op {op!r}", _suggest(str(op), OPS)))
        return out
    allowed = allowed_keys(cls)
    for key in b:
        if key not in allowed:
            out.append(PatchProblem(find(key, i), f"bend '{name}': '{key}' is not a setting of {op}",
                                    _suggest(key, allowed)))
    for knob in cls.knobs:
        if knob.name in b:
            v = b[knob.name]
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not knob.lo <= v <= knob.hi:
                out.append(PatchProblem(find(knob.name, i), f"bend '{name}': {knob.name} = {v!r} outside "
                                        f"{knob.lo}..{knob.hi}"))
    for key in cls.options:
        ok, expected = OPTION_CHECKS[key]
        if key in b and not ok(b[key]):
            out.append(PatchProblem(find(key, i), f"bend '{name}': {key} = {b[key]!r} is not {expected}"))
    if cls is OPS.get("cross.swap") and "with" not in b:
        out.append(PatchProblem(line, f"bend '{name}': cross.swap needs the word to swap in", 'with = "cat"'))
    if "mix" in b and (not isinstance(b["mix"], (int, float)) or not 0 <= b["mix"] <= 1):
        out.append(PatchProblem(find("mix", i), f"bend '{name}': mix = {b['mix']!r} outside 0..1"))
    if dims is not None:
        checks = [("layers", dims.layers, "layer")]
        if cls.units in ("heads", "neurons", "channels"):
            checks.append((cls.units, {"heads": dims.heads, "neurons": dims.ffn, "channels": dims.dim}[cls.units],
                           cls.units[:-1]))
        for key, n, what in checks:
            if key in b:
                try:
                    # Cluster targets are checked for form here; their units come from recorded activations.
                    stand_in = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
                    parse_indices(layer_spec(b[key], n) if key == "layers" else b[key], n, what=what,
                                  activations=stand_in if "cluster" in str(b[key]) else None)
                except TargetError as e:
                    out.append(PatchProblem(find(key, i), f"bend '{name}': {e}"))
    if "steps" in b:
        try:
            step_weights(b["steps"], dims.steps if dims else 4, "cpu")
        except TargetError as e:
            out.append(PatchProblem(find("steps", i), f"bend '{name}': {e}", "steps 0-3, or 'context'"))
    if "region" in b:
        try:
            parse_box(b["region"])
        except TargetError as e:
            out.append(PatchProblem(find("region", i), f"bend '{name}': {e}"))
    if "frames" in b:
        try:
            parse_indices(b["frames"], MAX_FRAMES, what="frame")
        except TargetError as e:
            out.append(PatchProblem(find("frames", i), f"bend '{name}': {e}"))
    return out


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    if close:
        return f"did you mean '{close[0]}'?"
    return "one of " + ", ".join(sorted(choices))


def load_patch(path: str | Path, dims: Dims | None = None) -> Patch:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"patch {path}: cannot read: {e}") from None
    return parse_patch(text, path, dims)


def apply_patch(engine, patch: Patch, progress=None) -> float:
    """Arm the patch's bends on the engine (structural); set its initial values. Returns seconds taken."""
    from .sites import BendSites

    activations = getattr(engine, "activations", None)
    if patch.uses_clusters() and activations is None:
        if progress:
            progress("recording activations for k-means targets")
        activations = engine.record_activations(patch.prompt or "", seed=patch.seed or 0)
    # The same bends, built once, are armed again when the same patch comes back: on the GPU their
    # captured graph is still there to replay.
    key = json.dumps(patch.bends, sort_keys=True, default=str)
    built = getattr(engine, "built_bends", None)
    if built is None:
        built = engine.built_bends = OrderedDict()
    bends = built.pop(key, None)
    if bends is None:
        try:
            bends = patch.build(engine.dims, engine.device, activations)
        except TargetError as e:
            raise PatchError(patch.path, [PatchProblem(None, str(e))]) from None
    else:
        for b in bends:
            b.rearm()
    built[key] = bends
    while len(built) > KEEP_BUILT:
        built.popitem(last=False)
    took = engine.set_bends(BendSites(bends, engine.dit.bends.probes))
    if patch.blend is not None:
        engine.params.set("prompt/blend", patch.blend)
    for name, value in patch.params.items():
        try:
            engine.params.set(name, value)
        except ValueError as e:
            if progress:
                progress(f"patch {patch.name}: {e}")
    engine.patch = patch
    if progress:
        progress(f"patch '{patch.name}': {len(bends)} bends armed in {took * 1000:.1f} ms")
    return took


def apply_patch_file(engine, path, progress=None) -> Patch:
    patch = load_patch(path, engine.dims)
    apply_patch(engine, patch, progress)
    return patch


# -- `instrument check` ------------------------------------------------------------------------
def configure(p) -> None:
    p.add_argument("files", nargs="+", metavar="FILE", help="patch files (TOML) to validate")
    p.add_argument("--model", metavar="DIR", help="check targets against this model's sizes (default: Wan 1.3B)")


WAN_1_3B = Dims(layers=30, heads=12, dim=1536, ffn=8960, text_len=512)


def run(args) -> int:
    dims = WAN_1_3B
    if args.model:
        import json

        try:
            cfg = json.loads((Path(args.model) / "transformer" / "config.json").read_text())
            dims = Dims(cfg["num_layers"], cfg["num_attention_heads"],
                        cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["ffn_dim"], 512)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"--model {args.model}: cannot read transformer/config.json: {e}") from None
    failed = 0
    for f in args.files:
        try:
            patch = load_patch(f, dims)
        except PatchError as e:
            failed += 1
            for p in e.problems:
                print(f"{f}:{p.line or 1}: {p.message}" + (f"\n    hint: {p.hint}" if p.hint else ""))
            continue
        except UserError as e:
            failed += 1
            print(str(e))
            continue
        ops = ", ".join(f"{b['name']} ({b['op']})" for b in patch.bends) or "no bends"
        print(f"{f}: ok: '{patch.name}', {ops}")
    return 1 if failed else 0
