"""`instrument bench`: how fast this machine streams, with every armed bend moving every chunk.

With no --model on a GPU it builds the real Wan2.1-T2V-1.3B configuration with random weights (speed does
not depend on the weight values); with --model it measures real weights; on a CPU it runs the embedded
default. It streams twice for --seconds each, unbent and then with the bench bends armed (self-attention,
cross-attention and FFN sites, all layers) while a sweep moves every bend parameter every chunk and a
control thread plays knobs at random times, and reports generated FPS, chunk time percentiles, DiT time
per pass, decode time, knob-to-frame latency, bend overhead, recompiles and CUDA-graph recaptures during
the timed part, peak GPU memory and the settings.
"""

from __future__ import annotations

import json
import math
import platform
import random
import subprocess
import threading
import time

import torch

from .engine.loading import WAN_CONFIGS
from .errors import UserError
from .progress import Progress
from .render import add_engine_arguments

BENCH_BENDS = """
name = "bench"
[[bend]]
name = "melt"
op = "self.temperature"
temperature = 1.5
[[bend]]
name = "heads"
op = "self.gain"
heads = "random 0.5 seed 1"
gain = 1.5
[[bend]]
name = "token"
op = "cross.gain"
tokens = "red, circle"
gain = 3.0
[[bend]]
name = "neurons"
op = "ffn.gain"
neurons = "random 0.1 seed 1"
gain = 1.5
[[bend]]
name = "surge"
op = "ffn.scale"
scale = 1.2
"""
BENCH_PROMPT = "a red circle moving over a blue background"


def configure(p) -> None:
    add_engine_arguments(p)
    p.add_argument("--seconds", type=float, default=20.0, help="timed streaming per phase (default 20)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--config", choices=sorted(WAN_CONFIGS), default="1.3b",
                   help="random-weight Wan configuration when no --model is given on a GPU")
    p.add_argument("--no-compile", action="store_true", help="eager passes (no torch.compile)")
    p.add_argument("--no-graphs", action="store_true", help="no CUDA graphs")
    p.add_argument("--phases", default="unbent,bent", help="which phases to time (unbent,bent)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after each timed phase, profile N more chunks: where a chunk's time goes, by kind of "
                        "kernel (attention, matmul, compiled elementwise, ...) and the 15 largest")


def build_engine(args, progress):
    from .engine.loading import RANDOM
    from .engine.stream import Engine

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    compile_, graphs = not args.no_compile and device != "cpu", not args.no_graphs and device != "cpu"
    model = args.model or (None if device == "cpu" else RANDOM + args.config)
    return Engine.load(model=model, checkpoint=args.checkpoint, device=device, decoder=args.decoder,
                       tiny_decoder=args.tiny_decoder, progress=progress, compile=compile_, graphs=graphs,
                       fp8=args.fp8)


class KnobPlayer:
    """A performer on a thread: moves a bend knob at random times, as MIDI or OSC would."""

    def __init__(self, params, names, rate_hz=30.0):
        self.params, self.names, self.period = params, names, 1.0 / rate_hz
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.rng = random.Random(1)

    def run(self):
        while not self.stop.wait(self.rng.uniform(0.2, 1.8) * self.period):
            name = self.rng.choice(self.names)
            spec = self.params.spec(name)
            self.params.set(name, self.rng.uniform(spec.lo, spec.hi), arrived=time.monotonic())


def percentile(values, q):
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def dynamo_compiles() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(sum(counters["stats"].values())) if "stats" in counters else 0
    except Exception:
        return 0


def run_phase(engine, args, bent: bool, progress) -> dict:
    from .bends.patch import apply_patch, parse_patch
    from .bends.sites import BendSites

    cuda = engine.device.type == "cuda"
    if bent:
        apply_patch(engine, parse_patch(args.patch_text, "bench", engine.dims), progress)
    else:
        engine.set_bends(BendSites.empty())
    stream = engine.stream(args.prompt or BENCH_PROMPT, seed=args.seed or 0, size=args.size, chunk=args.chunk,
                           sink=args.sink, window=args.window, overlap_decode=args.overlap_decode)
    stream.sync_timing = True  # (an overlapped stream splits DiT from decode time with CUDA events instead)
    names = [s.name for s in engine.params.specs("bend/")]
    t_warm = time.perf_counter()
    warm_chunks = stream.warm_up(progress)
    warm_s = time.perf_counter() - t_warm
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    compiles0, captures0 = dynamo_compiles(), engine.captures
    player = KnobPlayer(engine.params, names) if names else None
    if player:
        player.thread.start()
    chunk_s, dit_s, decode_s, latency, frames = [], [], [], [], 0
    sweep = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        for name in names:  # the scripted sweep: every armed parameter moves every chunk
            spec = engine.params.spec(name)
            engine.params.set(name, spec.lo + (spec.hi - spec.lo) * (0.5 + 0.5 * math.sin(sweep * 0.7 + len(name))),
                              arrived=time.monotonic())
        sweep += 1
        c = stream.next()
        done = time.monotonic()
        frames += c.frames.shape[0]
        chunk_s.append(c.timings["chunk_s"])
        dit_s.append(c.timings["dit_s"])
        decode_s.append(c.timings["decode_s"])
        if c.computed_with is not None:
            latency.append(done - c.computed_with)
    wall = time.perf_counter() - t0
    if player:
        player.stop.set()
        player.thread.join()
    profile = profile_chunks(stream, args.profile, cuda, progress) if args.profile else None
    passes = len(stream.settings.schedule) + 1
    ms = lambda v: None if v is None else round(v * 1000, 2)  # noqa: E731
    return {
        "bent": bent, "bends": names and sorted({n.split("/")[1] for n in names}),
        "warmup_s": round(warm_s, 1), "warmup_chunks": warm_chunks, "chunks": len(chunk_s), "frames": frames,
        "fps": round(frames / wall, 2),
        "chunk_ms_p50": ms(percentile(chunk_s, 50)), "chunk_ms_p95": ms(percentile(chunk_s, 95)),
        "dit_ms_per_pass_p50": ms(percentile([d / passes for d in dit_s], 50)),
        "decode_ms_p50": ms(percentile(decode_s, 50)),
        "latency_ms_p50": ms(percentile(latency, 50)), "latency_ms_p95": ms(percentile(latency, 95)),
        "recompiles": dynamo_compiles() - compiles0, "recaptures": engine.captures - captures0,
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        **({"profile": profile} if profile else {}),
    }


# Kernel (GPU) or operator (CPU) names -> what part of the pass they are, first match wins.
PROFILE_KINDS = (
    ("attention", ("sdpa", "fmha", "flash", "attention", "attn")),
    ("matmul", ("gemm", "gemv", "cutlass", "nvjet", "xmma", "scaled_mm", "matmul", "aten::mm", "aten::addmm",
                "aten::bmm", "aten::linear")),
    ("convolution", ("conv", "implicit")),
    ("fused elementwise (compiled)", ("triton",)),
    ("copy / fill", ("memcpy", "memset", "copy", "fill", "cat")),
)


def profile_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in PROFILE_KINDS if any(k in low for k in keys)), "other")


def profile_chunks(stream, chunks: int, cuda: bool, progress) -> dict:
    """Where a chunk's time goes: `chunks` more chunks under torch.profiler, kernels by GPU time on a GPU (the
    CUDA graphs' kernels included), operators by CPU self time on a CPU; per chunk, grouped by PROFILE_KINDS,
    and the 15 largest. The profiler slows the chunks down a little: read shares, not speeds."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    progress(f"  profiling {chunks} chunk(s)")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(chunks):
            stream.next()
        if cuda:
            torch.cuda.synchronize()
    rows = []
    for avg in prof.key_averages():
        if cuda:  # the GPU's own rows (kernels, copies); an operator's row repeats its kernels' time
            if avg.device_type != DeviceType.CUDA:
                continue
            ms = getattr(avg, "self_device_time_total", getattr(avg, "self_cuda_time_total", 0.0)) / 1000.0
            if ms <= 0:
                continue
        else:
            ms = avg.self_cpu_time_total / 1000.0
            if ms <= 0 or avg.key.startswith("ProfilerStep"):
                continue
        rows.append((avg.key, ms / chunks, avg.count / chunks))
    total = sum(ms for _, ms, _ in rows)
    kinds: dict[str, float] = {}
    for name, ms, _ in rows:
        kinds[profile_kind(name)] = kinds.get(profile_kind(name), 0.0) + ms
    rows.sort(key=lambda r: -r[1])
    result = {"chunks": chunks, "clock": "gpu kernels" if cuda else "cpu operators (self time)",
              "ms_per_chunk": round(total, 2),
              "by_kind_ms_per_chunk": {k: round(v, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
              "top": [{"name": n[:120], "kind": profile_kind(n), "ms_per_chunk": round(ms, 3),
                       "calls_per_chunk": round(calls, 1)} for n, ms, calls in rows[:15]]}
    shares = ", ".join(f"{k} {100 * v / max(total, 1e-9):.0f}%" for k, v in result["by_kind_ms_per_chunk"].items())
    progress(f"  profile: {total:.1f} ms per chunk ({result['clock']}): {shares}")
    return result


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
            platform.machine()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


def run(args) -> int:
    if args.seconds <= 0:
        raise UserError("--seconds must be positive")
    progress = Progress()
    t_start = time.perf_counter()
    args.patch_text = open(args.patch).read() if args.patch else BENCH_BENDS
    args.patch = None  # bench arms it per phase itself
    engine = build_engine(args, progress)
    load_s = time.perf_counter() - t_start
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    results = {"machine": machine(), "load_s": round(load_s, 1), "settings": {
        "model": engine.components.source, "device": str(engine.device), "dtype": str(engine.dtype),
        "decoder": engine.decoder_name, "chunk": args.chunk, "size": args.size or engine.default_size,
        "compile": engine.runner.compile, "cuda_graphs": engine.runner.graphs, "seconds": args.seconds,
        "steps": 4, "context_pass": True, "fp8": engine.fp8, "sink": args.sink, "window": args.window,
        "overlap_decode": args.overlap_decode}}
    for phase in phases:
        progress(f"phase '{phase}': warming up, then {args.seconds:.0f} s timed")
        results[phase] = run_phase(engine, args, phase == "bent", progress)
        r = results[phase]
        progress(f"phase '{phase}': {r['fps']} FPS, chunk p50 {r['chunk_ms_p50']} ms p95 {r['chunk_ms_p95']} ms, "
                 f"DiT {r['dit_ms_per_pass_p50']} ms/pass, decode {r['decode_ms_p50']} ms, latency p50 "
                 f"{r['latency_ms_p50']} ms p95 {r['latency_ms_p95']} ms, recompiles {r['recompiles']}, "
                 f"recaptures {r['recaptures']}")
    if "unbent" in results and "bent" in results:
        u, b = results["unbent"]["chunk_ms_p50"], results["bent"]["chunk_ms_p50"]
        results["bend_overhead_pct"] = round(100.0 * (b - u) / u, 2)
        progress(f"bend overhead: {results['bend_overhead_pct']}% (chunk p50, bent vs unbent)")
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0
