"""FP8 linears (instrument/engine/fp8.py) against a float64 reference, and the engine running them."""

import copy
import json
import subprocess
import sys

import pytest
import torch

from instrument.bends.patch import apply_patch, parse_patch
from instrument.bends.sites import BendSites
from instrument.engine import fp8
from tests.test_engine import tiny_engine, tiny_transformer

PROMPT = "a red circle moving over a blue background"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_is_the_quantized_product_computed_in_float64(dtype):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    lin = torch.nn.Linear(192, 640)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(640, 192, generator=g) * 0.07)
        lin.bias.copy_(torch.randn(640, generator=g))
    q = fp8.FP8Linear(lin)
    x = torch.randn(2, 37, 192, generator=g).to(dtype)
    got = q(x)
    assert got.dtype == dtype and got.shape == (2, 37, 640)
    ref = q.reference(x)
    # float32 accumulation of the same e4m3 operands: 1e-5 relative; a bfloat16 output adds its rounding
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    assert ((got.double() - ref).norm() / ref.norm()).item() < tol
    # and the quantization itself: e4m3 keeps 3 mantissa bits, about 4% relative error on a product
    exact = x.double() @ lin.weight.double().t() + lin.bias.double()
    err = ((got.double() - exact).norm() / exact.norm()).item()
    assert 1e-3 < err < 0.06, err


def test_one_loud_token_does_not_flush_the_others():
    lin = torch.nn.Linear(64, 32)
    q = fp8.FP8Linear(lin)
    x = torch.randn(5, 64)
    quiet = q(x)
    x[2] *= 1e4  # a sink token or a bent neuron: per-token scales keep it from taking the others' range
    loud = q(x)
    keep = [0, 1, 3, 4]
    assert torch.equal(loud[keep], quiet[keep])


def test_only_the_per_pass_linears_of_each_block_are_swapped():
    m = tiny_transformer(3)
    before = {n: p.clone() for n, p in m.named_parameters()}
    assert fp8.quantize_blocks(m) == 7 * len(m.blocks)
    for blk in m.blocks:
        assert all(isinstance(v, fp8.FP8Linear) for v in fp8.block_linears(blk).values())
        assert isinstance(blk.ffn.net[2], torch.nn.Linear)  # its per-token input quantization costs more than it saves
        assert isinstance(blk.attn2.to_k, torch.nn.Linear) and isinstance(blk.attn2.to_v, torch.nn.Linear)
    assert isinstance(m.proj_out, torch.nn.Linear)
    assert fp8.quantize_blocks(m) == 0  # already done: nothing twice
    left = dict(m.named_parameters())
    assert all(torch.equal(left[n], p) for n, p in before.items() if n in left)


def stream_latents(engine, kw, chunks):
    s = engine.stream(PROMPT, seed=4, **kw)
    return [s.next().latents.clone() for _ in range(chunks)]


def test_fp8_stream_stays_near_full_precision_and_bends_still_act():
    base = tiny_transformer(7)
    full, kw = tiny_engine(base)
    quant, _ = tiny_engine(copy.deepcopy(base))
    quant_engine = type(quant)(quant.components, "cpu", torch.float32, fp8=True)
    assert quant_engine.fp8
    ref = stream_latents(full, kw, 4)
    got = stream_latents(quant_engine, kw, 4)
    for a, b in zip(ref, got):  # a whole stream through 2 layers and 5 passes a chunk, cache included
        rel = ((b - a).norm() / a.norm()).item()
        assert 1e-4 < rel < 0.1, rel

    patch = parse_patch('[[bend]]\nname="g"\nop="ffn.gain"\nneurons="random 0.5 seed 1"\ngain=3.0\n'
                        '[[bend]]\nname="t"\nop="self.temperature"\ntemperature=2.0\n', dims=quant_engine.dims)
    apply_patch(quant_engine, patch)
    bent = stream_latents(quant_engine, kw, 2)
    assert ((bent[1] - got[1]).norm() / got[1].norm()).item() > 0.05
    for spec in quant_engine.params.specs("bend/"):
        if spec.name.endswith("/mix"):
            quant_engine.params.set(spec.name, 0.0)
    neutral = stream_latents(quant_engine, kw, 2)
    quant_engine.set_bends(BendSites.empty())
    assert all(torch.equal(a, b) for a, b in zip(neutral, got[:2])), "mix 0 under FP8 is the unbent FP8 stream"


def test_fp8_compiles_once_for_every_layer_and_pass():
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    from instrument.engine.graphs import PassRunner

    engine, kw = tiny_engine(tiny_transformer(9))
    engine = type(engine)(engine.components, "cpu", torch.float32, fp8=True)
    eager = stream_latents(engine, kw, 5)
    torch._dynamo.reset()
    counter = CompileCounter()
    engine.runner = PassRunner(engine.dit, "cpu", compile=True, graphs=False, backend=counter)
    try:
        got = stream_latents(engine, kw, 5)
    finally:
        engine.dit.run_block = engine.dit.block
        torch._dynamo.reset()
    assert counter.frame_count == 1, counter.frame_count
    for a, b in zip(eager, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_bench_on_the_cpu_runs_fp8_with_the_decode_overlapped(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "instrument.cli", "bench", "--device", "cpu", "--seconds", "0.5",
                        "--size", "64x48", "--window", "3", "--fp8", "--overlap-decode", "--profile", "1",
                        "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "FP8:" in r.stderr
    res = json.loads(out.read_text())
    assert res["settings"]["fp8"] is True and res["settings"]["overlap_decode"] is True
    assert res["settings"]["window"] == 3 and res["settings"]["size"] == [64, 48]
    for phase in ("unbent", "bent"):
        assert res[phase]["fps"] > 0 and res[phase]["recompiles"] == 0
        profile = res[phase]["profile"]  # where the chunk's time went: the DiT's matmuls and attention are in it
        kinds = profile["by_kind_ms_per_chunk"]
        assert profile["chunks"] == 1 and kinds["matmul"] > 0 and kinds["attention"] > 0
        assert abs(sum(kinds.values()) - profile["ms_per_chunk"]) < 0.05 * profile["ms_per_chunk"]
        assert len(profile["top"]) == 15 and profile["top"][0]["ms_per_chunk"] >= profile["top"][-1]["ms_per_chunk"]
    assert "bend_overhead_pct" in res
