"""One-off (2026-12-03): which tokens carry the background colour in a model: ablate the colour word, it and
the next word, the next two, and every token; frames (of 21) whose background still reads as the colour.
Output in background-tokens.txt (the eleventh run)."""
import sys
from instrument.engine.stream import Engine
from instrument.sketch import data, evaluate
from instrument.bends.patch import apply_patch, parse_patch
from instrument.progress import quiet
engine = Engine.load(sys.argv[1], device="cpu", progress=quiet)
def patch(tokens):
    return parse_patch(f'name = "a"\n\n[[bend]]\nname = "a"\nop = "cross.gain"\ntokens = "{tokens}"\ngain = 0.0\n', "<a>", engine.dims)
specs = [s for s in evaluate.held_out_specs(40) if s.description.background_colour not in ("grey", "gray")][:5]
for j, spec in enumerate(specs):
    colour = spec.description.background_colour
    words = spec.caption.split()
    i = words.index(colour, words.index(colour) + 1) if words.count(colour) > 1 else words.index(colour)
    rest = words[i + 1:]
    out = []
    for tokens in [colour, f"{colour}, {rest[0]}", f"{colour}, {rest[0]}, {rest[1]}", "all"]:
        apply_patch(engine, patch(tokens))
        frames = evaluate.stream_frames(engine, spec.caption, 21, seed=j)
        out.append(f"[{tokens}] {sum(data.background_colour(f) == colour for f in frames)}")
    print(spec.caption, " | ".join(out), flush=True)
