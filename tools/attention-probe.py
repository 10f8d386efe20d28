"""Time the window attention of one Wan2.1-1.3B self-attention call, per kernel, on the GPU machine.

    python tools/attention-probe.py --json probe.json

The shape is the steady-state chunk of `instrument bench`'s target settings (832x480, chunk 3: 4,680
query tokens; sink 3 + window 12 latent frames: 23,400 key tokens; 12 heads x 128). It times torch's
SDPA backends in bf16 and cuDNN's FP8 fused attention through cudnn-frontend (`nvidia-cudnn-frontend`,
carried as a wheel), checks each against a float32 computation on the same random inputs, and whether
the FP8 call can be captured in a CUDA graph. It answers whether FP8 attention is worth building into
the engine (BENCHMARKS.md round 6); it is not part of the engine.
"""

from __future__ import annotations

import argparse
import json
import math
import traceback

import torch
import torch.nn.functional as F


def timed(fn, iters: int = 30) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def fp8_attention(q, k, v, out_dtype):
    """A cudnn-frontend FP8 SDPA graph for these shapes: returns (run, out) with per-tensor scales."""
    import cudnn

    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    e4m3 = torch.float8_e4m3fn
    amax = 448.0
    scales = {}
    tensors = {}
    for name, x in (("q", q), ("k", k), ("v", v)):
        s = x.abs().amax().float() / amax
        tensors[name] = (x.float() / s).to(e4m3)
        scales[name] = s.reshape(1, 1, 1, 1)
    one = torch.ones(1, 1, 1, 1, device=q.device)
    graph = cudnn.pygraph(io_data_type=cudnn.data_type.FP8_E4M3, intermediate_data_type=cudnn.data_type.FLOAT,
                          compute_data_type=cudnn.data_type.FLOAT, handle=handle)
    tq, tk, tv = (graph.tensor_like(tensors[n]) for n in "qkv")
    scalar = {n: graph.tensor_like(one) for n in ("dq", "dk", "dv", "ds", "ss", "so")}
    o, _, amax_s, amax_o = graph.sdpa_fp8(q=tq, k=tk, v=tv, descale_q=scalar["dq"], descale_k=scalar["dk"],
                                          descale_v=scalar["dv"], descale_s=scalar["ds"], scale_s=scalar["ss"],
                                          scale_o=scalar["so"], generate_stats=False,
                                          attn_scale=1.0 / math.sqrt(q.shape[-1]))
    out = torch.empty(q.shape, device=q.device, dtype=out_dtype)
    o.set_output(True).set_dim(list(out.shape)).set_stride(list(out.stride())).set_data_type(out_dtype)
    for t in (amax_s, amax_o):
        t.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(cudnn.data_type.FLOAT)
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    workspace = torch.empty(graph.get_workspace_size(), device=q.device, dtype=torch.uint8)
    a_s, a_o = torch.empty(1, 1, 1, 1, device=q.device), torch.empty(1, 1, 1, 1, device=q.device)
    # P in [0, 1] is stored in FP8 scaled to the format's range, then the scale is taken out again
    values = {"dq": scales["q"], "dk": scales["k"], "dv": scales["v"], "ds": one / amax, "ss": one * amax,
              "so": one}
    pack = {tq: tensors["q"], tk: tensors["k"], tv: tensors["v"], o: out, amax_s: a_s, amax_o: a_o}
    pack.update({scalar[n]: values[n].contiguous() for n in scalar})

    def run():
        graph.execute(pack, workspace, handle=handle)

    def on_stream(stream):  # cuDNN launches on the handle's stream: a graph capture needs it to be the capturing one
        cudnn.set_stream(handle=handle, stream=stream.cuda_stream)

    return run, out, on_stream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--queries", type=int, default=4680)
    parser.add_argument("--keys", type=int, default=23400)
    args = parser.parse_args()
    torch.manual_seed(0)
    heads, dim = 12, 128
    q = torch.randn(1, heads, args.queries, dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, heads, args.keys, dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, heads, args.keys, dim, device="cuda", dtype=torch.bfloat16)
    flops = 4.0 * heads * args.queries * args.keys * dim
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    rows = {"shape": dict(queries=args.queries, keys=args.keys, heads=heads, dim=dim),
            "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "cudnn_backend": torch.backends.cudnn.version()}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for name, backend in (("sdpa_cudnn_bf16", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash_bf16", SDPBackend.FLASH_ATTENTION),
                          ("sdpa_efficient_bf16", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(q, k, v)
                ms = timed(lambda: F.scaled_dot_product_attention(q, k, v))
            rows[name] = dict(ms=round(ms, 3), tflops=round(flops / ms / 1e9, 1), rel_error=rel_error(out, ref))
        except Exception as e:  # a backend this build lacks is a result, not a failure
            rows[name] = dict(error=f"{type(e).__name__}: {e}"[:300])
        print(name, rows[name], flush=True)
    for out_name, out_dtype in (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn)):
        name = f"cudnn_fp8_out_{out_name}"
        try:
            run, out, on_stream = fp8_attention(q, k, v, out_dtype)
            run()
            torch.cuda.synchronize()
            ms = timed(run)
            row = dict(ms=round(ms, 3), tflops=round(flops / ms / 1e9, 1), rel_error=rel_error(out, ref))
            graph = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream()
            try:
                on_stream(stream)
                with torch.cuda.stream(stream):
                    run()
                    with torch.cuda.graph(graph, stream=stream):
                        run()
                on_stream(torch.cuda.current_stream())
                out.zero_()
                graph.replay()
                torch.cuda.synchronize()
                row["graph_replay_rel_error"] = rel_error(out, ref)
                row["graph_ms"] = round(timed(graph.replay), 3)
            except Exception as e:
                row["graph_error"] = f"{type(e).__name__}: {e}"[:300]
            rows[name] = row
        except Exception as e:
            rows[name] = dict(error=f"{type(e).__name__}: {e}"[:400], trace=traceback.format_exc()[-800:])
        print(name, rows[name], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
