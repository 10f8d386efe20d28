"""The bend engine in the stream: identity at mix 0, exact targeting, references, live data, NaN guard."""

import math

import pytest
import torch

from instrument.bends import bend as B
from instrument.bends.patch import PatchError, apply_patch, parse_patch
from instrument.bends.sites import BendSites
from instrument.engine.dit import TokenGrid
from test_engine import tiny_engine, tiny_transformer

PROMPT = "a red fox and a blue circle"

ALL_OPS = """
[[bend]]
name = "t"
op = "self.temperature"
temperature = 0.4
[[bend]]
name = "g"
op = "self.gain"
heads = "1"
gain = 2.5
[[bend]]
name = "a"
op = "self.ablate"
heads = "0"
[[bend]]
name = "x"
op = "self.transform"
degrees = 40
blur = 1.0
region = "left"
[[bend]]
name = "cg"
op = "cross.gain"
tokens = "fox"
gain = 5
[[bend]]
name = "cm"
op = "cross.map"
tokens = "red, circle"
scale = 2
dx = 0.3
sharpen = 1
[[bend]]
name = "cs"
op = "cross.swap"
tokens = "fox"
with = "circle"
[[bend]]
name = "fg"
op = "ffn.gain"
neurons = "0-40"
gain = -2
[[bend]]
name = "fo"
op = "ffn.offset"
neurons = "random 0.3 seed 2"
[[bend]]
name = "fi"
op = "ffn.invert"
[[bend]]
name = "fa"
op = "ffn.ablate"
neurons = "50-60"
[[bend]]
name = "ft"
op = "ffn.threshold"
[[bend]]
name = "fn"
op = "ffn.noise"
amount = 2
[[bend]]
name = "fs"
op = "ffn.scale"
scale = 3
frames = "0"
[[bend]]
name = "ha"
op = "hidden.ablate"
channels = "0-9"
[[bend]]
name = "hi"
op = "hidden.invert"
channels = "10-19"
[[bend]]
name = "hs"
op = "hidden.scale"
factor = -1.5
[[bend]]
name = "ht"
op = "hidden.threshold"
channels = "20-29"
[[bend]]
name = "hw"
op = "hidden.warp"
dx = 0.25
flip_v = 1
[[bend]]
name = "he"
op = "hidden.erode"
channels = "30-39"
[[bend]]
name = "hd"
op = "hidden.dilate"
channels = "40-47"
"""


def run(engine, kw, chunks=3, patch=None, seed=3, setup=None):
    if patch is not None:
        apply_patch(engine, parse_patch(patch, dims=engine.dims))
    else:
        engine.set_bends(BendSites.empty())
    if setup:
        setup(engine)
    s = engine.stream(PROMPT, seed=seed, **kw)
    return [s.next() for _ in range(chunks)]


@pytest.fixture(scope="module")
def rig():
    engine, kw = tiny_engine(tiny_transformer(8), chunk=1, sink=1, window=2, size=(64, 48))
    unbent = run(engine, kw)
    return engine, kw, unbent


def same(a, b):
    return all(torch.equal(x.latents, y.latents) and torch.equal(x.frames, y.frames) for x, y in zip(a, b))


def test_every_op_changes_the_picture_and_mix_0_is_bit_identical(rig):
    engine, kw, unbent = rig
    bent = run(engine, kw, patch=ALL_OPS)
    assert not same(bent, unbent)
    names = [b.name for b in engine.dit.bends.bends]

    def zero_mix(e):
        for n in names:
            e.params.set(f"bend/{n}/mix", 0.0)

    assert same(run(engine, kw, patch=ALL_OPS, setup=zero_mix), unbent)


def test_armed_cross_bends_add_no_attention_call(rig, monkeypatch):
    """Gains and value swaps ride in the one fused cross-attention call (BENCHMARKS round 9: a second call
    per layer and pass cost 9.5 ms a chunk); only map bends compute probabilities besides."""
    engine, kw, _ = rig
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    def count(patch):
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
        try:
            calls.clear()
            bent = run(engine, kw, chunks=2, patch=patch)
            return len(calls), bent
        finally:
            monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", real)

    plain, unbent = count(None)
    armed, bent = count('[[bend]]\nname="g"\nop="cross.gain"\ntokens="fox"\ngain=4\n'
                        '[[bend]]\nname="s"\nop="cross.swap"\ntokens="red"\nwith="blue"\n')
    assert plain > 0 and armed == plain
    assert not same(bent, unbent)


@pytest.mark.parametrize("op,knobs", [
    ("self.temperature", "temperature = 1.0"), ("self.gain", "gain = 1.0"), ("self.transform", ""),
    ("cross.gain", 'tokens = "fox"\ngain = 1.0'), ("cross.map", 'tokens = "fox"'),
    ("cross.swap", 'tokens = "fox"\nwith = "circle"\namount = 0.0'), ("ffn.gain", "gain = 1.0"),
    ("ffn.offset", "offset = 0.0"), ("ffn.noise", "amount = 0.0"), ("ffn.scale", "scale = 1.0"),
    ("hidden.scale", "factor = 1.0"), ("hidden.warp", ""),
])
def test_neutral_knobs_are_bit_identical(rig, op, knobs):
    engine, kw, unbent = rig
    patch = f'[[bend]]\nname = "n"\nop = "{op}"\n{knobs}\n'
    assert same(run(engine, kw, patch=patch), unbent)


def test_each_op_alone_changes_the_stream(rig):
    engine, kw, unbent = rig
    for entry in ALL_OPS.split("[[bend]]")[1:]:
        out = run(engine, kw, chunks=2, patch="[[bend]]" + entry)
        assert not same(out, unbent[:2]), entry


def test_layer_step_targets_touch_only_their_targets(rig):
    """A bend on layer 2 at step 1 leaves every activation before it bit-identical."""
    engine, kw, _ = rig
    seen = {}

    def record(tag):
        original = engine.dit.block

        def block(i, blk, x, *rest):
            step = rest[-2]
            out = original(i, blk, x, *rest)
            seen.setdefault(tag, []).append((i, step, out.clone()))
            return out

        engine.dit.block = block
        return original

    orig = record("plain")
    run(engine, kw, chunks=1)
    engine.dit.block = orig
    record("bent")
    run(engine, kw, chunks=1, patch='[[bend]]\nname="s"\nop="hidden.scale"\nlayers="1"\nsteps="1"\nfactor=3\n')
    engine.dit.block = orig
    first_diff = None
    for (i, step, a), (_, _, b) in zip(seen["plain"], seen["bent"]):
        if not torch.equal(a, b):
            first_diff = (step, i)
            break
    assert first_diff == (1, 1)


def test_units_touch_exactly_their_targets():
    dims = B.Dims(layers=4, heads=3, dim=12, ffn=10, text_len=16)
    grid = TokenGrid(2, 2, 3)

    class P:
        text, length = "red fox red", 4

        @staticmethod
        def positions(word):
            return {"red": [0, 2], "fox": [1]}.get(word, [])

    from instrument.params import ParamSpace

    # FFN neurons 2 and 7, layer 1 only, step 2 only
    b = B.FfnGain("n", {"neurons": [2, 7], "layers": "1", "steps": "2", "gain": 3.0}, dims, "cpu")
    b.load_values(ParamSpace(), P, grid)
    h = torch.randn(1, grid.tokens, 10, dtype=torch.float64)
    out = b.apply(1, 2, h)
    ref = h.clone()
    ref[..., [2, 7]] *= 3
    assert torch.equal(out, ref)
    assert torch.equal(b.apply(0, 2, h), h) and torch.equal(b.apply(1, 1, h), h) and torch.equal(b.apply(1, -1, h), h)
    # heads
    g = B.SelfGain("g", {"heads": "2", "gain": 0.5}, dims, "cpu")
    g.load_values(ParamSpace(), P, grid)
    o = torch.randn(1, grid.tokens, 3, 4)
    r = o.clone()
    r[:, :, 2] *= 0.5
    assert torch.equal(g.apply(0, 0, o, grid), r)
    # tokens by word follow the prompt
    c = B.CrossGain("c", {"tokens": "red", "gain": 4.0, "renormalise": False}, dims, "cpu")
    c.load_values(ParamSpace(), P, grid)
    assert c.unit_w.tolist()[:4] == [1, 0, 1, 0]
    v = torch.rand(1, 16, 3, 4, dtype=torch.float64)  # without renormalising, the gain scales value rows
    out = c.bend_values(0, 0, v)
    ref = v.clone()
    ref[:, [0, 2]] *= 4
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert torch.equal(out[:, [1, 3, 4]], v[:, [1, 3, 4]])
    # channels and frames (with a region)
    hb = B.HiddenAblate("h", {"channels": "3-4", "frames": "1"}, dims, "cpu")
    hb.load_values(ParamSpace(), P, grid)
    x = torch.randn(1, grid.tokens, 12)
    y = hb.apply(0, 0, x, grid).view(1, 2, 2, 3, 12)
    xv = x.view(1, 2, 2, 3, 12)
    assert torch.equal(y[:, 0], xv[:, 0])
    assert torch.equal(y[:, 1, ..., :3], xv[:, 1, ..., :3]) and torch.equal(y[:, 1, ..., 5:], xv[:, 1, ..., 5:])
    assert torch.all(y[:, 1, ..., 3:5] == 0)


def test_temperature_and_cross_gain_against_float64_attention():
    torch.manual_seed(0)
    dims = B.Dims(layers=1, heads=2, dim=8, ffn=4, text_len=6)
    grid = TokenGrid(1, 2, 2)
    from instrument.params import ParamSpace

    q = torch.randn(1, 4, 2, 4, dtype=torch.float64)
    k = torch.randn(1, 9, 2, 4, dtype=torch.float64)
    v = torch.randn(1, 9, 2, 4, dtype=torch.float64)
    t = B.SelfTemperature("t", {"heads": "1", "temperature": 0.5, "mix": 0.5}, dims, "cpu")
    t.load_values(ParamSpace(), None, grid)
    qb = t.apply(0, 0, q)
    factor = 1 + 0.5 * (1 / 0.5 - 1)  # mix 0.5 of the logit scale 1/T
    logits = torch.einsum("nhd,mhd->hnm", q[0], k[0]) / 2.0
    logits[1] *= factor
    ref = torch.einsum("hnm,mhd->nhd", logits.softmax(-1), v[0])
    out = torch.nn.functional.scaled_dot_product_attention(qb.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    torch.testing.assert_close(out.transpose(1, 2)[0], ref, rtol=1e-10, atol=1e-10)

    class P:
        text, length = "a b", 3

        @staticmethod
        def positions(word):
            return [1] if word == "b" else []

    c = B.CrossGain("c", {"tokens": "b", "gain": 3.0}, dims, "cpu")
    c.load_values(ParamSpace(), P, grid)
    sites = BendSites([c])
    kt, vt = torch.randn(1, 6, 2, 4, dtype=torch.float64), torch.randn(1, 6, 2, 4, dtype=torch.float64)
    out = sites.cross_attention(0, 0, q, kt, vt, grid)
    p = torch.einsum("nhd,thd->hnt", q[0], kt[0]).div(2.0).softmax(-1)
    p[..., 1] *= 3
    p = p / p.sum(-1, keepdim=True)
    # knobs live in float32 device tensors, so the logit bias carries float32 rounding
    torch.testing.assert_close(out[0], torch.einsum("hnt,thd->nhd", p, vt[0]), rtol=1e-6, atol=1e-7)


def test_token_targets_by_word_follow_a_prompt_change(rig):
    engine, kw, _ = rig
    apply_patch(engine, parse_patch('[[bend]]\nname="c"\nop="cross.gain"\ntokens="circle"\ngain=4\n', dims=engine.dims))
    s = engine.stream("a blue circle", seed=1, **kw)
    s.next()
    b = engine.dit.bends.bends[0]
    assert b.unit_w.nonzero().flatten().tolist() == s.prompt.positions("circle") == [2]
    s.set_prompt("one small red circle")
    s.next()
    assert b.unit_w.nonzero().flatten().tolist() == [3]


def test_knob_changes_keep_storage_and_never_recompile(rig):
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    engine, kw, _ = rig
    apply_patch(engine, parse_patch(ALL_OPS, dims=engine.dims))
    s = engine.stream(PROMPT, seed=1, **kw)
    ptrs = [(b.values.data_ptr(), b.layer_w.data_ptr(), b.step_w.data_ptr()) for b in engine.dit.bends.bends]
    torch._dynamo.reset()
    counter = CompileCounter()
    eager = engine.dit.forward
    engine.dit.forward = torch.compile(eager, backend=counter, dynamic=False)
    try:
        for _ in range(3):  # until the window is full, shapes still change (warm-up)
            s.next()
        warm = counter.frame_count
        for i in range(4):
            for spec in engine.params.specs("bend/"):
                engine.params.set(spec.name, spec.lo + (spec.hi - spec.lo) * ((i * 0.37 + 0.2) % 1.0))
            s.set_prompt(["a red fox", "a blue circle and a fox"][i % 2])
            s.next()
        assert counter.frame_count == warm, "a knob or prompt change recompiled"
    finally:
        engine.dit.forward = eager
        torch._dynamo.reset()
    assert ptrs == [(b.values.data_ptr(), b.layer_w.data_ptr(), b.step_w.data_ptr()) for b in engine.dit.bends.bends]


class Explode(B.HiddenScale):
    """hidden.scale with a range wide enough to overflow float32: the NaN guard's worst case."""

    op = "test.explode"
    knobs = (B.Knob("factor", -1e38, 1e38, 1e38),)


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlapped-decode"])
def test_nan_guard_holds_and_the_stream_recovers(rig, overlap):
    engine, kw, unbent = rig
    B.OPS[Explode.op] = Explode
    try:
        apply_patch(engine, parse_patch('[[bend]]\nname="boom"\nop="test.explode"\nlayers="0-1"\n', dims=engine.dims))
        s = engine.stream(PROMPT, seed=3, overlap_decode=overlap, **kw)
        c = s.next()
        assert torch.isfinite(c.latents).all()
        assert any("boom" in w and "non-finite" in w for w in c.warnings)
        engine.params.set("bend/boom/mix", 0.0)
        if overlap:  # the next chunk was launched before the knob moved: it blows up, and is repaired too
            c = s.next()
            assert torch.isfinite(c.latents).all() and c.warnings
        for _ in range(3):
            c = s.next()
            assert torch.isfinite(c.latents).all() and not c.warnings
    finally:
        del B.OPS[Explode.op]


def test_patch_errors_name_their_line_and_hint(rig):
    engine = rig[0]
    text = '\n'.join(['name = "x"', "", "[[bend]]", 'name = "a"', 'op = "self.temprature"', "",
                      "[[bend]]", 'name = "b"', 'op = "ffn.gain"', 'neurons = "0-99999"', 'gian = 2'])
    with pytest.raises(PatchError) as e:
        parse_patch(text, dims=engine.dims)
    msgs = [str(p) for p in e.value.problems]
    assert any(m.startswith("line 5:") and "self.temperature" in m for m in msgs), msgs
    assert any(m.startswith("line 10:") and "out of range" in m for m in msgs), msgs
    assert any(m.startswith("line 11:") and "'gain'" in m for m in msgs), msgs
    with pytest.raises(PatchError) as e:
        parse_patch("name = [unclosed\n", dims=engine.dims)
    assert e.value.problems[0].line == 1


def test_shipped_patches_check_clean_and_change_the_picture(rig):
    import glob
    import subprocess
    import sys

    from instrument.bends.patch import load_patch

    files = sorted(glob.glob("patches/*.toml"))
    assert len(files) >= 6
    r = subprocess.run([sys.executable, "-m", "instrument.cli", "check", *files], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    engine, kw, unbent = rig
    sites = set()
    for f in files:
        patch = load_patch(f, engine.dims)
        sites.update(B.OPS[b["op"]].site for b in patch.bends)
        apply_patch(engine, patch)
        s = engine.stream(PROMPT, seed=3, **kw)
        out = [s.next() for _ in range(3)]
        diff = max((a.frames.float() - b.frames.float()).abs().mean().item() for a, b in zip(out, unbent))
        assert diff > 1.0, f"{f} barely changes the picture ({diff:.2f} levels)"
    assert {"self.query", "self.heads", "self.out", "cross", "ffn.hidden", "ffn.out", "hidden"} <= sites


def test_probes_record_without_touching_the_stream(rig):
    from instrument.bends.probe import Probe

    engine, kw, unbent = rig
    engine.set_bends(BendSites.empty())
    d = engine.dims
    probes = [Probe("cross.map", d, "cpu", tokens="fox"), Probe("self.entropy", d, "cpu"),
              Probe("ffn.mean", d, "cpu"), Probe("hidden.mean", d, "cpu", layers="1")]
    engine.set_probes(probes)
    try:
        s = engine.stream(PROMPT, seed=3, **kw)
        out = [s.next() for _ in range(3)]
        assert same(out, unbent)
        m = probes[0].result()
        assert m.shape == (s.grid.frames, s.grid.height, s.grid.width) and 0 < m.min() and m.max() < 1
        ent = probes[1].result()
        assert ent.shape == (d.layers, d.heads) and torch.all(ent > 0)
        assert torch.all(ent <= math.log(s.cache.slots * s.cache.tokens_per_frame) + 1e-5)
        assert probes[2].result().shape == (d.layers, d.ffn)
        h = probes[3].result()
        assert torch.all(h[0] == 0) and torch.any(h[1] != 0)  # only layer 1 was probed
    finally:
        engine.set_probes([])


def test_probe_summaries_against_direct_computation():
    from instrument.bends.probe import Probe

    d = B.Dims(layers=2, heads=3, dim=8, ffn=5, text_len=6)
    grid = TokenGrid(1, 2, 2)

    class P:
        text, length = "a b", 3

        @staticmethod
        def positions(word):
            return [1, 2] if word == "b" else []

    p = torch.rand(1, 3, 4, 6, dtype=torch.float64).softmax(-1)
    pr = Probe("cross.map", d, "cpu", tokens="b")
    pr.load_values(P, grid)
    pr.record(0, 0, p, grid)
    torch.testing.assert_close(pr.result().double(), p[0, :, :, 1:3].sum(-1).mean(0).view(1, 2, 2), rtol=1e-6, atol=1e-6)
    q = torch.randn(1, 4, 3, 2, dtype=torch.float64)
    keys = torch.randn(1, 3, 7, 2, dtype=torch.float64)
    e = Probe("self.entropy", d, "cpu", layers="1")
    e.record(1, 0, q, keys)
    e.record(0, 0, q, keys)  # not a probed layer
    probs = torch.einsum("nhd,hmd->hnm", q[0], keys[0]).div(math.sqrt(2)).softmax(-1)
    ref = -(probs * probs.log()).sum(-1).mean(-1)
    out = e.result()
    torch.testing.assert_close(out[1].double(), ref, rtol=1e-5, atol=1e-6)
    assert torch.all(out[0] == 0)


def test_cluster_targets_come_from_recorded_activations(rig):
    from instrument.bends.targets import cluster_mask

    engine, kw, _ = rig
    engine.activations = None
    patch = parse_patch('prompt = "a red fox"\n[[bend]]\nname="k"\nop="ffn.gain"\nneurons="cluster 1 of 3 seed 2"\n',
                        dims=engine.dims)
    apply_patch(engine, patch)
    acts = engine.activations["neurons"]
    assert acts.shape == (engine.dims.ffn, engine.dims.layers)
    expected = cluster_mask(acts, 3, 1, seed=2)
    assert torch.equal(engine.dit.bends.bends[0].unit_w.bool(), expected.bool())
    engine.activations = None


from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
              st.text(max_size=12), st.sampled_from(list(B.OPS) + ["all", "red", "0-3", "context", "left"])),
    lambda inner: st.lists(inner, max_size=4), max_leaves=8)
_KEYS = st.sampled_from(["name", "op", "layers", "steps", "heads", "tokens", "neurons", "channels", "frames",
                         "region", "mix", "gain", "scale", "temperature", "with", "padding", "x", "seed", "size",
                         "iterations", "renormalise", "max_tokens"])


def _toml_value(v):
    import json

    if v is None:
        return '""'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if v != v else ("inf" if v == float("inf") else "-inf" if v == float("-inf") else repr(v))
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v) if isinstance(v, str) else str(v)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.dictionaries(_KEYS, _VALUES, max_size=6), max_size=4), st.text(max_size=40))
def test_patch_parser_fuzz_raises_only_patch_errors(rig, bends, junk):
    """Whatever a patch file holds, the parser answers with a PatchError (line + hint) or a patch."""
    engine = rig[0]
    text = "".join("[[bend]]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in b.items()) for b in bends)
    for candidate in (text, junk, text + junk):
        try:
            patch = parse_patch(candidate, dims=engine.dims)
        except PatchError as e:
            assert e.problems and all(str(p) for p in e.problems)
            continue
        bends_built = patch.build(engine.dims, "cpu")  # a patch that parses must also arm and run
        assert len(bends_built) == len(patch.bends)
        if bends_built:
            sites = BendSites(bends_built)
            grid = TokenGrid(1, 2, 2)
            prompt = engine.text.encode("a red fox")
            sites.load_values(engine.params, prompt, grid)
            d = engine.dims
            x = torch.randn(1, 4, d.dim)
            sites.hidden(0, 0, x, grid)
            sites.ffn_hidden(0, 0, torch.randn(1, 4, d.ffn))
            sites.ffn_out(0, 0, x, grid)
            q = torch.randn(1, 4, d.heads, d.dim // d.heads)
            sites.self_query(0, 0, q)
            sites.self_heads(0, 0, q, grid)
            sites.self_out(0, 0, x, grid)
            kv = torch.randn(1, d.text_len, d.heads, d.dim // d.heads)
            sites.cross_attention(0, 0, q, kv, kv, grid)


@pytest.mark.parametrize("renormalise", [True, False])
def test_cross_map_against_the_explicit_float64_computation(renormalise):
    """The column-correction path equals bending the full probability matrix and multiplying it out."""
    from instrument.bends import ops
    from instrument.params import ParamSpace

    torch.manual_seed(3)
    dims = B.Dims(layers=1, heads=2, dim=8, ffn=4, text_len=7)
    grid = TokenGrid(2, 3, 4)

    class P:
        text, length = "a red fox", 4

        @staticmethod
        def positions(word):
            return {"red": [1], "fox": [2]}.get(word, [])

    spec = {"tokens": "red, fox", "scale": 1.7, "degrees": 25.0, "dx": 0.2, "sharpen": 0.8, "amplify": 2.0,
            "mix": 0.7, "renormalise": renormalise, "max_tokens": 3}
    b = B.CrossMap("m", spec, dims, "cpu")
    b.load_values(ParamSpace(), P, grid)
    n = grid.tokens
    q = torch.randn(1, n, 2, 4, dtype=torch.float64)
    k = torch.randn(1, 7, 2, 4, dtype=torch.float64)
    v = torch.randn(1, 7, 2, 4, dtype=torch.float64)
    out = BendSites([b]).cross_attention(0, 0, q, k, v, grid)

    p = torch.einsum("nhd,thd->hnt", q[0], k[0]).div(2.0).softmax(-1)  # [heads, N, T]
    maps = p[:, :, [1, 2]].permute(0, 2, 1).reshape(2, 2, 2, 3, 4)  # [heads, K, F, H, W]
    bent = ops.sharpen(ops.amplify(ops.transform(maps, scale=1.7, degrees=25.0, dx=0.2), 2.0), 0.8,
                       padding="border")
    mixed = maps + 0.7 * (bent.to(torch.float32).double() - maps)
    ref = p.clone()
    ref[:, :, [1, 2]] = mixed.reshape(2, 2, n).permute(0, 2, 1)
    if renormalise:
        ref = ref.clamp_min(0)
        ref = ref / ref.sum(-1, keepdim=True)
    expected = torch.einsum("hnt,thd->nhd", ref, v[0])
    # the bend's knobs and resampling grid are float32 (device tensors): float32-level agreement
    torch.testing.assert_close(out[0], expected, rtol=2e-5, atol=2e-5)


def test_compiled_block_serves_every_layer_and_pass_with_the_same_result(rig):
    """The GPU path's regional compilation, on the CPU: one compile for all layers and passes of the
    steady state (layer and step as device tensors), knobs moving, same latents as eager."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    from instrument.engine.graphs import PassRunner

    engine, kw, _ = rig
    eager = run(engine, kw, chunks=6, patch=ALL_OPS)
    apply_patch(engine, parse_patch(ALL_OPS, dims=engine.dims))  # armed again: ffn.noise restarts its seed
    torch._dynamo.reset()
    counter = CompileCounter()
    saved = engine.runner
    engine.runner = PassRunner(engine.dit, "cpu", compile=True, graphs=False, backend=counter)
    try:
        s = engine.stream(PROMPT, seed=3, **kw)
        got = [s.next() for _ in range(6)]
        assert counter.frame_count == 1, counter.frame_count
        for spec in engine.params.specs("bend/"):
            engine.params.set(spec.name, spec.lo + 0.3 * (spec.hi - spec.lo))
        s.next()
        assert counter.frame_count == 1
    finally:
        engine.runner = saved
        engine.dit.run_block = engine.dit.block
        torch._dynamo.reset()
    for a, b in zip(eager, got):
        torch.testing.assert_close(b.latents, a.latents, rtol=1e-5, atol=1e-5)


def test_a_patch_armed_again_reuses_its_bends_with_its_own_values(rig):
    engine = rig[0]
    melt = parse_patch('[[bend]]\nname="m"\nop="self.temperature"\ntemperature=2.0\n', dims=engine.dims)
    other = parse_patch('[[bend]]\nname="g"\nop="ffn.gain"\n', dims=engine.dims)
    apply_patch(engine, melt)
    first = engine.dit.bends.bends[0]
    engine.params.set("bend/m/temperature", 3.5)
    engine.dit.bends.load_values(engine.params, engine.text.encode("a"), TokenGrid(1, 2, 2))
    apply_patch(engine, other)
    apply_patch(engine, melt)
    again = engine.dit.bends.bends[0]
    assert again is first  # same objects: a captured graph that reads them replays
    assert engine.params.get("bend/m/temperature") == 2.0 and float(again.k("temperature")) == 2.0


def test_overlapped_decode_streams_the_same_frames_with_knobs_one_chunk_later(rig):
    """overlap_decode launches chunk i+1's DiT before returning chunk i: the same stream, and a knob set
    between two calls reaches the chunk after the one it reaches otherwise (that one is already computed)."""
    engine, kw, _ = rig
    apply_patch(engine, parse_patch('[[bend]]\nname="t"\nop="self.temperature"\ntemperature=3.0\n',
                                    dims=engine.dims))

    def play(overlap, turn_at=None, chunks=6):
        engine.params.set("bend/t/mix", 0.0)
        s = engine.stream(PROMPT, seed=3, overlap_decode=overlap, **kw)
        out = []
        for i in range(chunks):
            if i == turn_at:
                engine.params.set("bend/t/mix", 1.0)
            out.append(s.next())
        return s, out

    _, still = play(False)
    _, plain = play(False, turn_at=3)
    s, overlapped = play(True, turn_at=3)
    assert same(plain[:3], still[:3]) and not same(plain[3:4], still[3:4])
    assert same(overlapped[:4], still[:4]), "chunk 3 was launched before the knob moved"
    assert not same(overlapped[4:5], still[4:5])
    s.reset()  # a reset drops the chunk in flight: the stream starts over exactly
    engine.params.set("bend/t/mix", 0.0)
    assert same([s.next() for _ in range(3)], still[:3])
    engine.set_bends(BendSites.empty())
