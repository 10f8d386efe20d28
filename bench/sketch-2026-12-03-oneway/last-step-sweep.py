"""Shape following on the validation captions under 4-step schedules that end at lower noise, the shape
reader trained once (the reader `evaluate` trains: the same seed and frames). The engine's last step returns
the model's clean prediction at the last sigma, a mean over what that noise still hides; a rotating object's
outline is what such a mean rounds first. One-off script of 2026-12-03:

    python bench/sketch-2026-12-03-oneway/last-step-sweep.py OUT.json NAME=MODEL... [--captions 200]
"""
import argparse
import json
import time

from instrument.engine.stream import Engine, warp
from instrument.progress import Progress
from instrument.sketch import evaluate, shapes

SCHEDULES = [  # 4 timesteps, shift 5 (the engine runs 4 steps and bends target them by number)
    (1000, 750, 500, 250),  # shipped: the last sigma 0.625
    (1000, 750, 500, 150),  # 0.469
    (1000, 750, 500, 100),  # 0.357
    (1000, 750, 500, 50),  # 0.208
    (1000, 750, 400, 100),
]

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("models", nargs="+", metavar="NAME=DIR")
parser.add_argument("--captions", type=int, default=200)
args = parser.parse_args()
progress = Progress()
reader = shapes.train(progress=progress)
results = []
for entry in args.models:
    name, folder = entry.split("=", 1)
    engine = Engine.load(folder, device="cpu", progress=progress)
    for schedule in SCHEDULES:
        engine.components.sampling = {"sampler": "renoise", "schedule": list(map(float, schedule)), "shift": 5.0}
        t0 = time.perf_counter()
        r = evaluate.shape_following(engine, reader, args.captions, split="validation")
        row = {"model": name, "schedule": schedule, "last_sigma": round(warp(schedule[-1], 5.0), 3),
               "shape": r["shape"], "by_motion": r["by_motion"], "frames_ok": r["frames_ok"],
               "one_piece": r["one_piece"], "frames_ok_by_index": r["frames_ok_by_index"],
               "seconds": round(time.perf_counter() - t0, 1)}
        results.append(row)
        progress(f"{name} {schedule}@5 (last sigma {row['last_sigma']}): shapes {r['shape']:.1%}, by motion "
                 f"{r['by_motion']} (frames {r['frames_ok']:.1%}, one piece {r['one_piece']:.1%})")
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
