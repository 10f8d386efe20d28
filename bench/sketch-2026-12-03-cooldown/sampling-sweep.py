"""Shape following under several sampling settings, on the validation captions (evaluate --split validation),
the shape reader trained once. One-off script of 2026-12-03:

    python bench/sketch-2026-12-03-cooldown/sampling-sweep.py OUT.json MODEL... [--captions 200]
"""
import argparse
import json
import time

from instrument.engine.stream import Engine
from instrument.progress import Progress
from instrument.sketch import evaluate, shapes

SETTINGS = [  # (sampler, schedule, shift)
    ("renoise", (1000, 750, 500, 250), 5.0),
    ("renoise", (1000, 750, 500, 250), 3.0),
    ("renoise", (1000, 750, 500, 250), 2.0),
    ("renoise", (1000, 750, 500, 250), 1.0),
    ("renoise", (1000, 850, 650, 400), 3.0),
]

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("models", nargs="+")
parser.add_argument("--captions", type=int, default=200)
args = parser.parse_args()
progress = Progress()
reader = shapes.train(frames=12000, progress=progress)
results = []
for model in args.models:
    engine = Engine.load(model, device="cpu", progress=progress)
    for sampler, schedule, shift in SETTINGS:
        engine.components.sampling = {"sampler": sampler, "schedule": list(map(float, schedule)), "shift": shift}
        t0 = time.perf_counter()
        r = evaluate.shape_following(engine, reader, args.captions, split="validation")
        row = {"model": model, "sampler": sampler, "schedule": schedule, "shift": shift, "shape": r["shape"],
               "frames_ok": r["frames_ok"], "one_piece": r["one_piece"],
               "frames_ok_by_index": r["frames_ok_by_index"], "seconds": round(time.perf_counter() - t0, 1)}
        results.append(row)
        progress(f"{model} {sampler} {schedule}@{shift:g}: shapes {r['shape']:.1%} (frames {r['frames_ok']:.1%}, "
                 f"one piece {r['one_piece']:.1%})")
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
