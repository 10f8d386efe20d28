"""Is a rotating object's outline lost because the caption leaves its spin open? For rotating single-object
clips (validation seeds, made to rotate with data.spun), the shape the reader reads at each of the first chunk's
9 frames in:
  codec      the clip through the codec (as drawn: one spin);
  mean-all   the decoded mean of the codec latents of K renders at spins drawn as training draws them (either
             way round, 1 to 2.5 rad/s): what a model that cannot tell the spin from the words would predict;
  mean-sign  the same with the clip's own direction and K speeds;
  mean-speed the same with the clip's own speed, both directions (K = 2);
  dit@S      the DiT's clean prediction from the clip's latents noised to sigma S, its own caption;
  stream     the engine's first chunk of the caption (renoise, the folder's schedule).
Usage: python spin-mean.py [--model DIR] [--clips N] [--k K] [--json OUT]"""
import argparse
import json
from dataclasses import replace

import numpy as np
import torch

from instrument.engine.stream import Engine
from instrument.engine.vae import to_uint8_frames
from instrument.sketch import data, shapes
from instrument.sketch.evaluate import SPLITS, FIRST_CHUNK, TEMPORAL
from instrument.sketch.shapes import single_object_specs

p = argparse.ArgumentParser()
p.add_argument("--model", default=None)
p.add_argument("--clips", type=int, default=40)
p.add_argument("--k", type=int, default=16)
p.add_argument("--json", default=None)
args = p.parse_args()
torch.manual_seed(0)
engine = Engine.load(args.model, device="cpu")
codec = engine.components.vae
scale, upright = engine.components.object_scale, engine.components.upright
reader = shapes.train()
FRAMES = 1 + (FIRST_CHUNK - 1) * TEMPORAL
times = data.clip_times(FRAMES)
side = engine.default_size[0]
rng = np.random.default_rng(7)

specs = []
for s in single_object_specs(SPLITS["validation"] + 10**6, 4 * args.clips, scale, upright):
    s = data.spun(s, rng)
    if s.instances[0].motion == "rotating":
        specs.append(s)
    if len(specs) == args.clips:
        break


def with_spin(spec, spin):
    return replace(spec, instances=(replace(spec.instances[0], spin=spin), *spec.instances[1:]))


def reads(latents, colour):
    video = to_uint8_frames(codec.decode(latents).float())
    return [reader.read_mask(data.object_mask(f, colour)) for f in data.frames_of(video)[:FRAMES]]


def latents_of(spec_list):
    with torch.no_grad():
        return codec.encode(data.render(spec_list, times, side)).float()


SIGMAS = (0.6, 0.8, 0.9)
kinds = ["codec", "mean-all", "mean-sign", "mean-speed"] + [f"dit@{s:g}" for s in SIGMAS] + ["stream"]
right = {k: [0] * FRAMES for k in kinds}
rows = []
for j, spec in enumerate(specs):
    inst = spec.instances[0]
    truth, colour, spin = inst.shape, inst.colour, inst.spin
    row = {"caption": spec.caption, "spin": spin}
    with torch.no_grad():
        z = latents_of([spec])
        row["codec"] = reads(z, colour)
        draw = np.random.default_rng(j)
        all_spins = [float(draw.choice([-1, 1]) * draw.uniform(1.0, 2.5)) for _ in range(args.k)]
        sign_spins = [float(np.sign(spin) * draw.uniform(1.0, 2.5)) for _ in range(args.k)]
        for name, spins in (("mean-all", all_spins), ("mean-sign", sign_spins), ("mean-speed", [spin, -spin])):
            row[name] = reads(latents_of([with_spin(spec, s) for s in spins]).mean(0, keepdim=True), colour)
        stream = engine.stream(spec.caption, chunk=FIRST_CHUNK)
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(j))
        for s in SIGMAS:
            row[f"dit@{s:g}"] = reads(stream.predict_clean((1 - s) * z + s * noise, s), colour)
        frames = engine.stream(spec.caption, seed=j, chunk=FIRST_CHUNK).next().frames
        row["stream"] = [reader.read_mask(data.object_mask(f, colour)) for f in data.frames_of(frames)[:FRAMES]]
    for k in kinds:
        for i, r in enumerate(row[k]):
            right[k][i] += r == truth
    rows.append(row)
    print(f"{j + 1}/{len(specs)} {spec.caption} spin {spin:+.2f}: " + "; ".join(
        f"{k} {sum(r == truth for r in row[k][1:])}/8" for k in kinds), flush=True)

print(f"\n{len(specs)} rotating clips, read right at frames 0..{FRAMES - 1} (K = {args.k}):")
for k in kinds:
    print(f"{k:>11}: {right[k]}  frames 1-8: {sum(right[k][1:])}/{8 * len(specs)}")
if args.json:
    json.dump({"clips": len(specs), "k": args.k, "right_by_frame": right, "rows": rows}, open(args.json, "w"), indent=1)
