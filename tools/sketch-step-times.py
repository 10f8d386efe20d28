"""Where a sketch training step's time goes, per batch size, on the machine it runs on (the GPU machine).

    python tools/sketch-step-times.py --device cuda --json times.json

For each DiT batch size (and count of openings, --dit-openings): the whole step as `Trainer.run` takes it
(losses left on the device), the batch alone (clips rendered and encoded by the codec: `Trainer.dit_batch`;
the openings' `Trainer.opening_batch` apart) and the full clips' loss forward alone, each
synchronised and averaged over --steps steps after --warmup; then the codec step per codec batch size. Random weights: the time
does not depend on them. It answers whether a step is bound by the GPU's arithmetic (time grows with the
batch) or by the host (it does not), which decides the batch sizes of the 25-minute run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time

import torch

from instrument.sketch.train import Config, Trainer


def enqueued(fn, device, steps: int) -> float:
    """Milliseconds the host takes to queue fn's work, each call from an idle GPU: near `timed`'s figure, the
    work is bound by the host (Python and kernel launches), not by the GPU."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    total = 0.0
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        fn()
        total += time.perf_counter() - t0
    sync()
    return total / steps * 1000.0


def timed(fn, device, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - t0) / steps * 1000.0


# The parts of a DiT step, as `Trainer._dit_step` calls them; each is wrapped in a profiler range on the instance
PARTS = ("dit_batch", "opening_batch", "dit_loss", "opening_loss", "_step")


def profiled(trainer, steps: int) -> str:
    """A text report of `steps` DiT steps under torch.profiler: per part, host ms, GPU span ms and kernel
    launches a step (on a CPU, operators dispatched), then the operators by host time."""
    from torch.profiler import ProfilerActivity, profile, record_function

    cuda = trainer.device.type == "cuda"  # the trainer's device, not merely whether this machine has a GPU

    for name in PARTS:
        def wrapped(*a, _fn=getattr(trainer, name), _name=name, **k):
            with record_function(f"part:{_name}"):
                return _fn(*a, **k)
        setattr(trainer, name, wrapped)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            with record_function("part:step"):
                trainer._dit_step()
        sync()
        wall = (time.perf_counter() - t0) / steps * 1000.0
    # Each part's host time (its range on the CPU), its span on the GPU's timeline (the same range as the GPU
    # ran it: the profiler keeps both under one name, the GPU's as a device event), and the kernels it launched:
    # a launch belongs to the innermost part whose host range holds it, whichever thread (autograd's backward
    # runs on its own) made it. On a CPU, the operators the part dispatched stand in for launches.
    launch_names = {"cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx"}
    ranges, launches = [], []
    for e in prof.events():
        if e.name.startswith("part:") and e.device_type == torch.autograd.DeviceType.CPU:
            ranges.append((e.time_range.start, e.time_range.end, e.name[5:]))
        elif (e.name in launch_names) if cuda else (e.name.startswith("aten::") and (
                e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))):
            launches.append(e.time_range.start)
    host, span, count = {}, {}, {}
    for start, end, name in ranges:
        host[name] = host.get(name, 0.0) + (end - start) / 1000.0 / steps
    for avg in prof.key_averages():
        if avg.key.startswith("part:"):
            name = avg.key[5:]
            span[name] = max(span.get(name, 0.0), getattr(avg, "device_time_total", 0.0) / 1000.0 / steps)
    for t in launches:
        inside = [(end - start, name) for start, end, name in ranges if start <= t <= end]
        name = min(inside)[1] if inside else "outside"
        count[name] = count.get(name, 0) + 1
    # the kernels' own time, as the profiler's table totals it: the GPU's events less its user annotations (the
    # parts' ranges and compiled graphs' calls as the GPU ran them, which span kernels rather than add to them)
    kernels = sum(e.self_device_time_total for e in prof.events()
                  if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation) / 1000.0 / steps
    what = "kernel launches" if cuda else "operators dispatched"
    lines = [f"{steps} steps profiled: {wall:.1f} ms a step (profiler on), kernels {kernels:.1f} ms a step, "
             f"{len(launches) / steps:.0f} {what} a step", "",
             f"{'part':<16}{'host ms':>10}{'GPU span ms':>13}{what:>22}"]
    for name in PARTS + ("step", "outside"):
        lines.append(f"{name:<16}{host.get(name, 0.0):>10.1f}{span.get(name, 0.0):>13.1f}"
                     f"{count.get(name, 0) / steps:>22.0f}")
    lines.append("(the step's own row: what its parts leave, the EMA and bookkeeping)")
    lines += ["", prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=60)]
    return "\n".join(lines)


# The trainers below never checkpoint: their output folder is never written.
def dit_row(batch: int, device: str, steps: int, warmup: int, outline_weight: float = 0.0, openings: int = 0,
            compile: bool | str = False, twins: float = 0.0, prefetch: bool = False,
            profile_steps: int = 0) -> dict:
    config = Config(dit_batch=batch, dit_outline_weight=outline_weight, dit_openings=openings, dit_twins=twins,
                    opening_swap=bool(twins and openings), clip_swap=bool(twins))
    trainer = Trainer(tempfile.gettempdir(), config, device, progress=lambda *a: None, compile=compile,
                      prefetch=prefetch)
    trainer.codec.eval().requires_grad_(False)
    trainer.stage = "dit"
    fixed = trainer.dit_batch(0)
    if trainer.prefetch is not None:  # the worker's start (spawned, importing torch) stays out of the timing
        trainer.opening_batch(0)
        for job in list(trainer.prefetch.jobs.values()):
            job.result()
    # with the worker, only step_ms shows it: the batch timings below draw one step's batch again and again,
    # and a step the worker drew is handed over once
    step = timed(trainer._dit_step, device, steps, warmup)  # as `run` steps: losses stay on the device
    data = timed(lambda: trainer.dit_batch(trainer.steps["dit"]), device, steps, 1)
    host = enqueued(lambda: trainer.dit_batch(trainer.steps["dit"]), device, steps)

    def forward():
        with torch.no_grad():
            trainer.dit_loss(*fixed)

    fwd = timed(forward, device, steps, 1)
    opening = timed(lambda: trainer.opening_batch(trainer.steps["dit"]), device, steps, 1) if openings else 0.0
    report = profiled(trainer, profile_steps) if profile_steps else None
    if trainer.prefetch is not None:
        trainer.prefetch.close()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return dict(stage="dit", batch=batch, openings=openings, outline_weight=outline_weight, compile=compile,
                prefetch=prefetch, twins=twins, step_ms=round(step, 1),
                batch_ms=round(data, 1), batch_host_ms=round(host, 1), openings_batch_ms=round(opening, 1), forward_ms=round(fwd, 1),
                clips_per_s=round(batch / step * 1000.0, 1), openings_per_s=round(openings / step * 1000.0, 1),
                peak_gib=None if peak is None else round(peak, 2), profile=report)


def codec_row(batch: int, device: str, steps: int, warmup: int) -> dict:
    trainer = Trainer(tempfile.gettempdir(), Config(codec_batch=batch), device, progress=lambda *a: None)
    step = timed(trainer._codec_step, device, steps, warmup)
    data = timed(lambda: trainer.codec_batch(trainer.steps["codec"]), device, steps, 1)
    return dict(stage="codec", batch=batch, step_ms=round(step, 1), batch_ms=round(data, 1),
                clips_per_s=round(batch / step * 1000.0, 1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dit-batches", default="32,64,128")
    parser.add_argument("--dit-outline-weights", default="0",
                        help="each DiT batch size timed at each of these --dit-outline-weight values (0: no outline)")
    parser.add_argument("--dit-openings", default="0",
                        help="each DiT batch size timed with each of these --dit-openings counts (0: none)")
    parser.add_argument("--compile", default="0",
                        help="each row without (0) and/or with (1) the DiT blocks, condition embedder and text encoder "
                             "compiled (train --compile), or "
                             "compiled in a torch.compile mode (train --compile MODE), e.g. 0,1,max-autotune-no-cudagraphs")
    parser.add_argument("--prefetch", default="0",
                        help="each row without (0) and/or with (1) the worker process that draws the next steps' "
                             "clip specs (train on a GPU runs with it), e.g. 0,1")
    parser.add_argument("--dit-twins", type=float, default=0.0,
                        help="the twin-pair share (train --dit-twins), with --opening-swap and --clip-swap as the "
                             "shipped run trains")
    parser.add_argument("--codec-batches", default="16,32,64")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default=None)
    parser.add_argument("--profile", default=None, metavar="FILE",
                        help="trace each DiT row's steps with torch.profiler; the per-part report goes to FILE")
    parser.add_argument("--profile-steps", type=int, default=5)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rows = []
    def listed(text: str, kind) -> list:
        return [kind(x) for x in text.split(",") if x]

    for b, w, n, c, p in itertools.product(listed(args.dit_batches, int), listed(args.dit_outline_weights, float),
                                           listed(args.dit_openings, int),
                                           listed(args.compile, lambda x: {"0": False, "1": True}.get(x, x)),
                                           listed(args.prefetch, lambda x: x == "1")):
        rows.append(dit_row(b, args.device, args.steps, args.warmup, w, n, c, args.dit_twins, p,
                            args.profile_steps if args.profile else 0))
        report = rows[-1].pop("profile")
        print(rows[-1], flush=True)
        if report:
            summary, parts = report.split("\n\n")[:2]
            print(summary, "\n", parts, flush=True)
            with open(args.profile, "a") as f:
                f.write(f"{rows[-1]}\n{report}\n\n")
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    for b in listed(args.codec_batches, int):
        rows.append(codec_row(b, args.device, args.steps, args.warmup))
        print(rows[-1], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=args.device, torch=torch.__version__, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
