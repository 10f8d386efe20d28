"""Rotating captions through each model's stream: N single-object validation captions made to rotate
(data.spun, as spin-mean.py draws them), 21 frames each (seed = the caption's index), the shape reader on each
frame; a caption is right when the majority of its frames reads as its shape (evaluate's shape following).
One reader for all models, so they are read alike. Each caption's turning direction too: frame 0's object
pixels turned about their centroid by 0.1 to 0.7 radians each way, the best cover of frame 4's mask
("clockwise" when that way covers more, by at least 0.02; else "unclear").
Usage: python rotating-streams.py [--captions N] [--json OUT] NAME=MODEL_DIR..."""
import argparse
import json

import numpy as np
import torch

from instrument.engine.stream import Engine
from instrument.sketch import data, shapes
from instrument.sketch.evaluate import SPLITS, stream_frames
from instrument.sketch.shapes import single_object_specs

p = argparse.ArgumentParser()
p.add_argument("--captions", type=int, default=60)
p.add_argument("--json", default=None)
p.add_argument("models", nargs="+", metavar="NAME=DIR")
args = p.parse_args()
torch.manual_seed(0)
reader = shapes.train()
FRAMES = 21
ANGLES = np.linspace(0.1, 0.7, 13)


def direction(first, later) -> str:
    ys, xs = torch.nonzero(first, as_tuple=True)
    if ys.numel() < 12 or later.sum() < 12:
        return "unclear"
    cx, cy = xs.float().mean(), ys.float().mean()
    dx, dy = xs.float() - cx, ys.float() - cy
    cover = {}
    for way, sign in (("clockwise", 1.0), ("anticlockwise", -1.0)):  # rows point down: clockwise takes the top right
        best = 0.0
        for a in sign * ANGLES:
            x = (cx + dx * np.cos(a) - dy * np.sin(a)).round().long().clamp(0, later.shape[1] - 1)
            y = (cy + dx * np.sin(a) + dy * np.cos(a)).round().long().clamp(0, later.shape[0] - 1)
            best = max(best, float(later[y, x].float().mean()))
        cover[way] = best
    if abs(cover["clockwise"] - cover["anticlockwise"]) < 0.02:
        return "unclear"
    return max(cover, key=cover.get)

# the direction reader on real clips first: 40 rotating clips as rendered, against their drawn spin
rng = np.random.default_rng(3)
checked = {"right": 0, "wrong": 0, "unclear": 0}
for s in single_object_specs(10**9, 400, 2.0, True):
    s = data.spun(s, rng)
    if s.instances[0].motion == "rotating" and sum(checked.values()) < 40:
        frames = data.render([s], data.clip_times(5), 128)[0]
        seen = direction(*(data.object_mask(frames[:, t], s.instances[0].colour) for t in (0, 4)))
        drawn = "clockwise" if s.instances[0].spin > 0 else "anticlockwise"
        checked["unclear" if seen == "unclear" else "right" if seen == drawn else "wrong"] += 1
print(f"direction read on 40 rendered rotating clips: {checked}", flush=True)
report = {"direction_check": checked}
for item in args.models:
    name, folder = item.split("=", 1)
    engine = Engine.load(folder, device="cpu")
    rng = np.random.default_rng(7)
    specs = []
    for s in single_object_specs(SPLITS["validation"] + 10**6, 4 * args.captions, engine.components.object_scale,
                                 engine.components.upright):
        s = data.spun(s, rng)
        if s.instances[0].motion == "rotating":
            specs.append(s)
        if len(specs) == args.captions:
            break
    rows, by_frame = [], [0] * FRAMES
    for j, spec in enumerate(specs):
        truth = spec.instances[0]
        video = stream_frames(engine, spec.caption, FRAMES, seed=j)
        masks = [data.object_mask(f, truth.colour) for f in data.frames_of(video)[:FRAMES]]
        read = [reader.read_mask(m) for m in masks]
        for i, r in enumerate(read):
            by_frame[i] += r == truth.shape
        rows.append({"caption": spec.caption, "read": read, "ok": data.majority(read) == truth.shape,
                     "turns": direction(masks[0], masks[4])})
    right = sum(r["ok"] for r in rows)
    turns = {w: sum(r["turns"] == w for r in rows) for w in ("clockwise", "anticlockwise", "unclear")}
    report[name] = {"model": folder, "captions": len(rows), "right": right, "by_frame": by_frame, "turns": turns,
                    "rows": rows}
    print(f"{name} ({folder}): {right} of {len(rows)} rotating captions right; frames 1-8 "
          f"{sum(by_frame[1:9])} of {8 * len(rows)}, 9-20 {sum(by_frame[9:])} of {12 * len(rows)}; "
          f"by frame {by_frame}; frames 0 to 4 turn {turns}", flush=True)
if args.json:
    json.dump(report, open(args.json, "w"), indent=1)
