"""Experiment: contrastive guidance on the opening chunk only (ninth model, CPU)."""
import sys, json, re, time, torch
from instrument.engine import stream as S
from instrument.engine.stream import Engine
from instrument.sketch import data, shapes, evaluate as ev

MODE = {"w": 0.0, "neg": "shapes", "steps": 4}

orig_launch = S.Stream._launch
def negatives(text):
    d = data.describe(text)
    shape = d.groups[0].shape
    if MODE["neg"] == "empty":
        return [""]
    if MODE["neg"] == "drop":
        return [re.sub(rf"\b{shape}\b ?", "", text)]
    return [re.sub(rf"\b{shape}\b", s, text) for s in data.SHAPES if s != shape]

def launch(self):
    if self.frame != 0 or MODE["w"] == 0.0:
        return orig_launch(self)
    e = self.engine
    t0 = time.perf_counter()
    arrived = e.params.take_arrivals()
    self._take_controls()
    s = self.settings
    first = self.frame
    self.cache.place(first, s.chunk)
    rope = S.rope_tables(self.grid, first, e.dit.head_dim, device=e.device)
    negs = [e.dit.prompt_context(e.text.encode(n).embeddings) for n in negatives(self.prompt.text)]
    sigmas = s.sigmas
    x = self._noise(); x0 = x
    for step, sigma in enumerate(sigmas):
        t = torch.full((1,), sigma * 1000.0, device=e.device)
        v = e.runner(x, t, self.context, self.cache, rope, step, len(sigmas)).float()
        if step < MODE["steps"]:
            vn = sum(e.runner(x, t, c, self.cache, rope, step, len(sigmas)).float() for c in negs) / len(negs)
            v = vn + MODE["w"] * (v - vn)
        x0 = (x.float() - sigma * v).to(e.dtype)
        if step + 1 < len(sigmas):
            nxt = sigmas[step + 1]
            noise = x0.float() + v
            x = ((1.0 - nxt) * x0.float() + nxt * noise).to(e.dtype)
    self._keep(x0, first, rope)
    return S._Launched(first, x0, arrived, t0, time.perf_counter(), None)
S.Stream._launch = launch

engine = Engine.load(sys.argv[1], device="cpu")
reader = shapes.train(frames=6000)
res = {}
for spec in sys.argv[2:]:
    w, neg, steps = spec.split(":")
    MODE.update(w=float(w), neg=neg, steps=int(steps))
    t = time.time()
    r = ev.shape_following(engine, reader, 100)
    pf = ev.prompt_following(engine, 50) if float(w) else None
    res[spec] = (r["shape"], r["one_piece"], None if pf is None else (pf["object_colour"], pf["background_colour"]))
    print(spec, res[spec], [round(x, 2) for x in r["frames_ok_by_index"][::4]], f"{time.time()-t:.0f}s", flush=True)
