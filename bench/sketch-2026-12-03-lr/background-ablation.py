"""One-off (2026-12-03): ablate the background colour word (cross.gain 0) of held-out captions and count the
frames (of 21) whose background still reads as that colour. `python background-ablation.py MODEL [CAPTIONS]`
from the repository root; output in background-ablation.txt (ninth, eleventh, eleventh at 2,400 steps)."""
import sys
from instrument.engine.stream import Engine
from instrument.sketch import data, evaluate
from instrument.bends.patch import apply_patch, parse_patch
from instrument.progress import quiet
model = sys.argv[1]
engine = Engine.load(model, device="cpu", progress=quiet)
unbent = parse_patch('name = "unbent"\n', "<unbent>", engine.dims)
specs = [s for s in evaluate.held_out_specs(40) if s.description.background_colour not in ("grey", "gray")][:int(sys.argv[2]) if len(sys.argv) > 2 else 12]
for j, spec in enumerate(specs):
    colour = spec.description.background_colour
    apply_patch(engine, unbent)
    before = evaluate.stream_frames(engine, spec.caption, 21, seed=j)
    apply_patch(engine, parse_patch(evaluate.ablation_patch(colour), "<ablate>", engine.dims))
    after = evaluate.stream_frames(engine, spec.caption, 21, seed=j)
    b = sum(data.background_colour(f) == colour for f in before); a = sum(data.background_colour(f) == colour for f in after)
    print(f"{b:2d} -> {a:2d}  after reads {sorted(set(data.background_colour(f) for f in after))}  {spec.caption}", flush=True)
