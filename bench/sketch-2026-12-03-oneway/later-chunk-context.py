"""Is a rotating object's outline lost in a stream's second chunk because of the context it is drawn from
(the model's own first chunk) or in spite of it? For rotating single-object validation clips (turned
clockwise, as a `--one-way-spin` model trained; at the model's `spin_speed` where it has one), the shape
reader on the second chunk's 12 frames (9 to 20), decoded after the first chunk as a stream decodes them:
  codec         the clip itself through the codec;
  real-context  the engine's second chunk drawn from noise (its sampler and schedule) after the clip's real
                first chunk was fed as context (Stream.feed);
  own-context   the engine's second chunk after its own first chunk (a stream from the caption alone);
  real-x0@0.6   the clean prediction from the clip's second chunk noised to sigma 0.6, real context.
Usage: python later-chunk-context.py [--clips N] [--json OUT] NAME=MODEL_DIR..."""
import argparse
import json

import numpy as np
import torch

from instrument.engine.stream import Engine
from instrument.engine.vae import to_uint8_frames
from instrument.sketch import data, shapes
from instrument.sketch.evaluate import SPLITS, FIRST_CHUNK, TEMPORAL
from instrument.sketch.shapes import single_object_specs

p = argparse.ArgumentParser()
p.add_argument("--clips", type=int, default=40)
p.add_argument("--json", default=None)
p.add_argument("models", nargs="+", metavar="NAME=DIR")
args = p.parse_args()
torch.manual_seed(0)
reader = shapes.train()
FIRST = 1 + (FIRST_CHUNK - 1) * TEMPORAL  # 9 frames
FRAMES = 1 + (2 * FIRST_CHUNK - 1) * TEMPORAL  # 21
times = data.clip_times(FRAMES)
KINDS = ("codec", "real-context", "own-context", "real-x0@0.6")
report = {}
for item in args.models:
    name, folder = item.split("=", 1)
    engine = Engine.load(folder, device="cpu")
    codec = engine.components.vae
    # the engine's components carry no training settings but the sampling ones: read the folder's own record
    speed = float(json.load(open(f"{folder}/model_index.json"))["sketch"].get("spin_speed", 0.0))
    rng = np.random.default_rng(7)
    specs = []
    for s in single_object_specs(SPLITS["validation"] + 10**6, 4 * args.clips, engine.components.object_scale,
                                 engine.components.upright):
        s = data.one_way(data.spun(s, rng))
        if speed:
            s = data.steady(s, speed)
        if s.instances[0].motion == "rotating":
            specs.append(s)
        if len(specs) == args.clips:
            break

    def reads(first_chunk, second_chunk, colour):
        video = to_uint8_frames(codec.decode(torch.cat([first_chunk, second_chunk], dim=2)).float())[FIRST:]
        return [reader.read_mask(data.object_mask(f, colour)) for f in data.frames_of(video)]

    right = {k: [0] * (FRAMES - FIRST) for k in KINDS}
    rows = []
    for j, spec in enumerate(specs):
        truth = spec.instances[0]
        row = {"caption": spec.caption, "spin": truth.spin}
        with torch.no_grad():
            z = codec.encode(data.render([spec], times, engine.default_size[0])).float()
            context, later = z[:, :, :FIRST_CHUNK], z[:, :, FIRST_CHUNK:]
            row["codec"] = reads(context, later, truth.colour)
            stream = engine.stream(spec.caption, seed=j, chunk=FIRST_CHUNK)
            stream.feed(context)
            row["real-context"] = reads(context, stream.next().latents.float(), truth.colour)
            own = engine.stream(spec.caption, seed=j, chunk=FIRST_CHUNK)
            own_first = own.next().latents.float()
            row["own-context"] = reads(own_first, own.next().latents.float(), truth.colour)
            stream = engine.stream(spec.caption, chunk=FIRST_CHUNK)
            stream.feed(context)
            noise = torch.randn(later.shape, generator=torch.Generator().manual_seed(j))
            row["real-x0@0.6"] = reads(context, stream.predict_clean(0.4 * later + 0.6 * noise, 0.6), truth.colour)
        for k in KINDS:
            for i, r in enumerate(row[k]):
                right[k][i] += r == truth.shape
        rows.append(row)
    report[name] = {"model": folder, "spin_speed": speed, "clips": len(specs), "right_by_frame": right,
                    "rows": rows}
    print(f"{name} ({folder}, spin speed {speed or 'as drawn'}), {len(specs)} clockwise rotating clips, frames 9-20 "
          f"read right, of {12 * len(specs)}: " + "; ".join(f"{k} {sum(right[k])}" for k in KINDS), flush=True)
    for k in KINDS:
        print(f"  {k:>13} by frame: {right[k]}", flush=True)
if args.json:
    json.dump(report, open(args.json, "w"), indent=1)
