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


# The trainers below never checkpoint: their output folder is never written.
def dit_row(batch: int, device: str, steps: int, warmup: int, outline_weight: float = 0.0, openings: int = 0,
            compile: bool | str = False, twins: float = 0.0, prefetch: bool = False) -> dict:
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
    if trainer.prefetch is not None:
        trainer.prefetch.close()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return dict(stage="dit", batch=batch, openings=openings, outline_weight=outline_weight, compile=compile,
                prefetch=prefetch, twins=twins, step_ms=round(step, 1),
                batch_ms=round(data, 1), batch_host_ms=round(host, 1), openings_batch_ms=round(opening, 1), forward_ms=round(fwd, 1),
                clips_per_s=round(batch / step * 1000.0, 1), openings_per_s=round(openings / step * 1000.0, 1),
                peak_gib=None if peak is None else round(peak, 2))


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
                        help="each row without (0) and/or with (1) the DiT blocks compiled (train --compile), or "
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
        rows.append(dit_row(b, args.device, args.steps, args.warmup, w, n, c, args.dit_twins, p))
        print(rows[-1], flush=True)
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
