"""Saving the live state as a patch, and morphing between two patches, on the embedded engine."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from instrument.bends.bend import MIX, OPS
from instrument.bends.morph import (
    MORPH, current_patch, morph, patch_to_toml, patch_values, save_patch_file)
from instrument.bends.patch import apply_patch, load_patch, parse_patch
from instrument.engine.stream import Engine
from instrument.progress import quiet

SIZE = (64, 64)


@pytest.fixture(scope="module")
def engine():
    return Engine.load(progress=quiet)


def knob_values(rng: random.Random, op: str) -> dict:
    """Fresh random in-range values for every knob of an op (and its mix)."""
    return {k.name: rng.uniform(k.lo, k.hi) for k in (MIX, *OPS[op].knobs)}


def as_engine_holds(values: dict) -> dict:
    return {n: float(np.float32(v)) if n.startswith("bend/") else v for n, v in values.items()}


def patch_a(rng) -> str:
    g, t, w = (knob_values(rng, op) for op in ("ffn.gain", "self.temperature", "hidden.warp"))
    return f"""
name = "alpha"
prompt = "a red circle moving over a blue background"
seed = 5

[[bend]]
name = "grow"
op = "ffn.gain"
layers = "1-2"
neurons = "0-63"
gain = {g['gain']!r}
mix = {g['mix']!r}

[[bend]]
name = "melt"
op = "self.temperature"
layers = "0-3"
heads = "0, 2"
temperature = {t['temperature']!r}
mix = {t['mix']!r}

[[bend]]
name = "twist"
op = "hidden.warp"
layers = "2"
channels = "0-47"
region = [0.1, 0.2, 0.7, 0.9]
degrees = {w['degrees']!r}
scale = {w['scale']!r}
mix = {w['mix']!r}

[params]
"bend/twist/feather" = 0.3
"""


def patch_b(rng) -> str:
    g, t, c = (knob_values(rng, op) for op in ("ffn.gain", "self.gain", "cross.gain"))
    return f"""
name = "beta"
prompt = "two green squares spinning slowly"
seed = 9

[[bend]]
name = "grow"            # same name, op and targets as alpha's: interpolates
op = "ffn.gain"
layers = "1-2"
neurons = "0-63"
gain = {g['gain']!r}
mix = {g['mix']!r}

[[bend]]
name = "melt"            # same name, another op: a second bend that fades in
op = "self.gain"
heads = "1"
gain = {t['gain']!r}
mix = {t['mix']!r}

[[bend]]
name = "shout"
op = "cross.gain"
tokens = "green"
gain = {c['gain']!r}
mix = {c['mix']!r}
"""


def test_save_then_load_gives_the_same_state(engine, tmp_path):
    rng = random.Random()
    stream = engine.stream("a red circle", seed=3, size=SIZE)
    apply_patch(engine, parse_patch(patch_a(rng), "a.toml", engine.dims))
    stream.set_prompt("two blue stars", slot=1)
    # the live state moves away from the file: every knob somewhere fresh
    for spec in engine.params.specs("bend/"):
        engine.params.set(spec.name, rng.uniform(spec.lo, spec.hi))
    engine.params.set("bend/twist/x0", 0.05)  # the region box is live too
    engine.params.set("prompt/blend", rng.random())
    # the bends hold their knobs as float32: that is the state a patch must reproduce
    want = as_engine_holds(engine.params.values())
    saved = current_patch(engine, stream, "after the solo")
    path = save_patch_file(saved, tmp_path)
    assert path.name == "after-the-solo.toml"

    apply_patch(engine, parse_patch(patch_b(rng), "b.toml", engine.dims))  # play something else
    assert engine.params.values() != want
    loaded = load_patch(path, engine.dims)
    apply_patch(engine, loaded)
    assert as_engine_holds(engine.params.values()) == want  # bit for bit: knobs, mixes, region, blend
    assert (loaded.name, loaded.prompt, loaded.prompt_b, loaded.seed) == (
        "after the solo", "a red circle", "two blue stars", 3)
    assert [b["name"] for b in loaded.bends] == ["grow", "melt", "twist"]
    assert loaded.bends[2]["region"] == [0.1, 0.2, 0.7, 0.9]  # structure kept, live box in [params]
    assert loaded.params["bend/twist/x0"] == 0.05
    # and the saved text is the same when saved again from the reloaded state
    assert patch_to_toml(current_patch(engine, stream, "after the solo")) == path.read_text()


def test_save_never_overwrites(engine, tmp_path):
    apply_patch(engine, parse_patch(patch_a(random.Random()), "a.toml", engine.dims))
    p = current_patch(engine, None, "take")
    paths = [save_patch_file(p, tmp_path) for _ in range(3)]
    assert [x.name for x in paths] == ["take.toml", "take-2.toml", "take-3.toml"]
    (tmp_path / "take-4.toml").write_text("# someone else's\n")
    assert save_patch_file(p, tmp_path).name == "take-5.toml"
    assert (tmp_path / "take-4.toml").read_text() == "# someone else's\n"


def test_morph_ends_are_exactly_the_patches_and_the_middle_is_halfway(engine):
    rng = random.Random()
    a = parse_patch(patch_a(rng), "a.toml", engine.dims)
    b = parse_patch(patch_b(rng), "b.toml", engine.dims)
    # references straight from the engine: what arming each patch on its own declares
    apply_patch(engine, a)
    ref_a = engine.params.values("bend/")
    apply_patch(engine, b)
    ref_b = engine.params.values("bend/")
    assert patch_values(a, engine.dims).items() >= ref_a.items()

    m = morph(engine, a, b)
    names = set(engine.params.values("bend/"))
    # union: grow is shared, alpha's melt and twist stay, beta's melt arrives as melt-b
    assert {n.split("/")[1] for n in names} == {"grow", "melt", "twist", "melt-b", "shout"}
    b_name = {n: n.replace("bend/melt/", "bend/melt-b/") for n in ref_b}
    a_only = {n for n in names if n.split("/")[1] in ("melt", "twist")}
    b_only = {n for n in names if n.split("/")[1] in ("melt-b", "shout")}
    assert m.prompts == (a.prompt, b.prompt)

    engine.params.set(MORPH, 0.0)
    m.tick()
    got = engine.params.values("bend/")
    for n, v in ref_a.items():
        assert got[n] == v, n
    for n in b_only:
        assert got[n] == (0.0 if n.endswith("/mix") else ref_b[n.replace("melt-b", "melt")]), n
    assert engine.params.get("prompt/blend") == 0.0

    engine.params.set(MORPH, 1.0)
    m.tick()
    got = engine.params.values("bend/")
    for n, v in ref_b.items():
        assert got[b_name[n]] == v, n
    for n in a_only:
        assert got[n] == (0.0 if n.endswith("/mix") else ref_a[n]), n
    assert engine.params.get("prompt/blend") == 1.0

    t = rng.uniform(0.2, 0.8)
    engine.params.set(MORPH, t)
    m.tick()
    got = engine.params.values("bend/")
    for knob in ("gain", "mix"):  # shared bend: float64 linear interpolation of both ends
        n = f"bend/grow/{knob}"
        assert got[n] == pytest.approx((1 - t) * ref_a[n] + t * ref_b[n], rel=1e-12, abs=1e-12)
    assert got["bend/melt/mix"] == pytest.approx((1 - t) * ref_a["bend/melt/mix"], abs=1e-12)
    assert got["bend/shout/mix"] == pytest.approx(t * ref_b["bend/shout/mix"], abs=1e-12)
    assert got["bend/twist/degrees"] == ref_a["bend/twist/degrees"]  # a fading bend keeps its shape
    assert engine.params.get("prompt/blend") == t


def test_morph_at_zero_renders_exactly_patch_a(engine):
    rng = random.Random()
    a = parse_patch(patch_a(rng), "a.toml", engine.dims)
    b = parse_patch(patch_b(rng), "b.toml", engine.dims)
    apply_patch(engine, a)
    want = engine.stream(a.prompt, seed=11, size=SIZE).next().frames
    m = morph(engine, a, b)
    assert engine.params.get(MORPH) == 0.0
    stream = engine.stream(a.prompt, seed=11, size=SIZE)
    stream.set_prompt(b.prompt, 1)
    got = stream.next().frames
    assert torch.equal(got, want)  # B's bends at mix 0 and blend 0 change nothing at all
    engine.params.set(MORPH, 0.6)
    m.tick()
    stream.reset(11)
    moved = stream.next().frames
    assert not torch.equal(moved, want)


def test_morph_param_goes_with_the_next_switch(engine):
    rng = random.Random()
    a = parse_patch(patch_a(rng), "a.toml", engine.dims)
    b = parse_patch(patch_b(rng), "b.toml", engine.dims)
    m = morph(engine, a, b, at=0.25)
    assert engine.params.get(MORPH) == 0.25
    engine.params.remove_prefix(MORPH)
    apply_patch(engine, a)
    assert m.tick() is False  # nothing to drive any more, and nothing written
    assert engine.params.values("bend/") == patch_values(a, engine.dims)

