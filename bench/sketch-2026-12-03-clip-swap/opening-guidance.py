"""Experiment: contrastive guidance on the opening chunk only (ninth model, CPU).

    python bench/sketch-2026-12-03-clip-swap/opening-guidance.py MODEL W:NEGATIVES:STEPS ...

The stream samples as the engine does (Stream._launch, unchanged); only the DiT pass the opening chunk's
first STEPS steps call is wrapped: v = v_neg + w (v - v_neg), v_neg the mean velocity of the negatives
("shapes": the caption with each other shape word, "empty": the empty caption, "drop": the caption
without its shape word). The clean pass (step CONTEXT_STEP) and later chunks are left alone."""
import re
import sys
import time

from instrument.engine.stream import Engine, Stream
from instrument.sketch import data, shapes, evaluate as ev

MODE = {"w": 0.0, "neg": "shapes", "steps": 4}


def negatives(text):
    shape = data.describe(text).groups[0].shape
    if MODE["neg"] == "empty":
        return [""]
    if MODE["neg"] == "drop":
        return [re.sub(rf"\b{shape}\b ?", "", text)]
    return [re.sub(rf"\b{shape}\b", s, text) for s in data.SHAPES if s != shape]


def guided(runner, stream):
    """The engine's pass, guided while the stream draws its opening chunk."""
    def run(x, t, context, cache, rope, step, steps):
        v = runner(x, t, context, cache, rope, step, steps)
        if stream.frame != 0 or MODE["w"] == 0.0 or not 0 <= step < MODE["steps"]:
            return v
        e = stream.engine
        negs = [e.dit.prompt_context(e.text.encode(n).embeddings) for n in negatives(stream.prompt.text)]
        vn = sum(runner(x, t, c, cache, rope, step, steps).float() for c in negs) / len(negs)
        return (vn + MODE["w"] * (v.float() - vn)).to(v.dtype)
    return run


original_launch = Stream._launch


def launch(self):
    e = self.engine
    plain, e.runner = e.runner, guided(e.runner, self)
    try:
        return original_launch(self)
    finally:
        e.runner = plain


Stream._launch = launch

engine = Engine.load(sys.argv[1], device="cpu")
reader = shapes.train(frames=6000)
for spec in sys.argv[2:]:
    w, neg, steps = spec.split(":")
    MODE.update(w=float(w), neg=neg, steps=int(steps))
    t = time.time()
    r = ev.shape_following(engine, reader, 100)
    pf = ev.prompt_following(engine, 50) if float(w) else None
    print(spec, (r["shape"], r["one_piece"], None if pf is None else (pf["object_colour"], pf["background_colour"])),
          [round(x, 2) for x in r["frames_ok_by_index"][::4]], f"{time.time() - t:.0f}s", flush=True)
