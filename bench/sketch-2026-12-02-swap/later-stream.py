# One-off (README, "Eighth run"): the stream's second chunk after the clip's real first chunk (Stream.feed) and after
# the model's own, read frame by frame by the shape reader; 60 held-out single-object captions.
import sys

import numpy as np
import torch

from instrument.engine.stream import Engine
from instrument.sketch import data, evaluate, shapes
from instrument.sketch.evaluate import FIRST_CHUNK, TEMPORAL, to_uint8_frames
from instrument.progress import Progress
engine = Engine.load(sys.argv[1] if len(sys.argv) > 1 else None, device="cpu", progress=Progress(enabled=False))
reader = shapes.train(frames=6000, seed=0)
codec = engine.components.vae
n = 60
times = data.clip_times(1 + (2 * FIRST_CHUNK - 1) * TEMPORAL)
res = {"real": np.zeros(21), "own": np.zeros(21)}
for j, spec in enumerate(shapes.single_object_specs(evaluate.HELD_OUT, n, 2.0, True)):
    truth = spec.instances[0]
    with torch.no_grad():
        z = codec.encode(data.render([spec], times, 128)).float()
        for kind in ("real", "own"):
            st = engine.stream(spec.caption, seed=j, chunk=FIRST_CHUNK)
            if kind == "real":
                st.feed(z[:, :, :FIRST_CHUNK]); first = z[:, :, :FIRST_CHUNK]
            else:
                first = st.next().latents.float()
            second = st.next().latents.float()
            video = to_uint8_frames(codec.decode(torch.cat([first, second], 2)).float())
            for i, f in enumerate(data.frames_of(video)[:21]):
                res[kind][i] += reader.read_mask(data.object_mask(f, truth.colour)) == truth.shape
for k, v in res.items():
    print(k, " ".join(f"{x / n:.0%}" for x in v))
