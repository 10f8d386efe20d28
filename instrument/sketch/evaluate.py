"""Measure a sketch model through the streaming engine: prompt following, long streams, word ablation, strips.

    python -m instrument.sketch.evaluate --model runs/sketch/model --json eval.json --strip strip.png
    python -m instrument.sketch.evaluate --json eval.json            # the embedded default

Every figure comes from the frames the engine streams, as `instrument play` shows them (uint8), read with
the pixel statistics of `data` (frame_colours): the procedural data uses exact palette colours for objects
and shades of one palette colour for the background, so a frame's colours say what it shows. The same
statistics read the procedural clips themselves (`source="clips"`), which gives the ceiling a perfect
model would reach on the same captions, and the clips through the codec, encoded and decoded
(`source="codec"`): the ceiling of any DiT that decodes through this codec.

- prompt following: held-out captions (clip seeds the trainer never draws); a stream agrees with its
  caption when its dominant object colour is one the caption names and its background is the caption's
  background colour; `object_frames` counts, frame by frame, where a colour the caption names is the
  frame's dominant object colour (a clip's majority vote hides an object that shows, then fades).
- shape following: held-out single-object captions (prompt and shape following: `--split test` by default;
  `validation`, other seeds, is where sampling settings are chosen); a small CNN (`shapes.ShapeReader`, trained at the
  start on the procedural clips' own object masks) reads the shape of the caption's colour in each frame,
  and a stream agrees when the majority of its readings is the caption's shape. The same reader on the
  clips themselves gives its ceiling.
- coherence: one stream of 1000+ frames per caption; per chunk the object colour, the frames' contrast
  (pixel std) and the change from frame to frame; collapse is a stream whose last fifth lost its contrast
  (below half the first fifth's, or below MIN_CONTRAST) or stopped following its caption compared with
  its first fifth, or that produced a non-finite value.
- word use: the DiT's clean prediction for noised held-out clips with the caption's own words against the
  same caption with one word swapped (object colour, shape, background colour): whether the model uses
  that kind of word at all, without training a reader or streaming.
- shape denoising: held-out single-object clips noised to each of several sigmas; the shape reader reads the
  DiT's clean prediction (decoded), with the caption's own shape word and with another: how far up the
  noise the model keeps the clip's outline, and whether a shape word ever overrides the outline it sees.
  It places a shape failure: a model that keeps outlines at low noise and ignores the word at all noise
  levels draws the right shape only by chance in a stream, whose outline is decided at high noise.
- word ablation: a colour word's cross-attention taken away (cross.gain 0 on its tokens, every layer and
  step); that colour's share of the frame before and after, and mix 0 giving the unbent frames exactly;
  then the background's colour word likewise, the frames whose background still reads as that colour.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..engine.vae import to_uint8_frames
from ..errors import UserError, module_main
from ..progress import Progress
from . import data
from .codec import TEMPORAL, Codec, latent_max

HELD_OUT = 2**50  # clip seeds from here on: the trainer draws below 2**42 (seed 0) or from 2**60 (seed >= 1)
# Where prompt and shape following draw their captions. Sampling settings (schedule, shift, sampler) are
# chosen on "validation", so that the figures quoted on "test" are not the best of several tries on them.
SPLITS = {"test": HELD_OUT, "validation": HELD_OUT + 4 * 10**6}
MIN_CONTRAST = 0.01  # pixel std below which a frame is flat (procedural clips at 128: 0.025 to 0.18)
STRIP_PROMPTS = (
    "a red circle moving right over a blue plain background",
    "a yellow star rotating on a purple striped background",
    "two green squares bouncing over a white checkered background",
    "a pink heart growing over a black gradient background",
    "an orange triangle moving down and a cyan ring bouncing over a grey noisy background",
)


def split_start(split: str) -> int:
    if split not in SPLITS:
        raise UserError(f"--split {split}: expected one of {', '.join(SPLITS)}")
    return SPLITS[split]


def held_out_specs(count: int, object_scale: float = 1.0, upright: bool = False,
                   split: str = "test") -> list[data.ClipSpec]:
    start = split_start(split)
    return [data.sample(start + j, object_scale, upright) for j in range(count)]


def stream_chunks(engine, prompt: str, frames: int, seed: int = 0, chunk: int = 3):
    """(uint8 frames [N >= frames, H, W, 3], clean latents [1, C, n, h, w]) of one stream, with whatever
    bends the engine has armed."""
    stream = engine.stream(prompt, seed=seed, chunk=chunk)
    out, latents, have = [], [], 0
    while have < frames:
        c = stream.next()
        out.append(c.frames)
        latents.append(c.latents.float().cpu())
        have += c.frames.shape[0]
    return torch.cat(out), torch.cat(latents, dim=2)


def stream_frames(engine, prompt: str, frames: int, seed: int = 0, chunk: int = 3) -> torch.Tensor:
    return stream_chunks(engine, prompt, frames, seed, chunk)[0]


def _agrees(desc: data.Description, obj: str | None, background: str | None) -> tuple[bool, bool]:
    return obj in desc.colours, background == desc.background_colour


SOURCES = ("stream", "clips", "codec")


def _drawing(engine, object_scale: float | None, upright: bool | None = None) -> tuple[float, bool]:
    """How the held-out clips draw their objects: as the engine's model was trained (data.sample's
    object_scale and upright), with `object_scale` and `upright` instead where given."""
    if engine is None:
        return (1.0 if object_scale is None else object_scale), bool(upright)
    c = engine.components
    return (c.object_scale if object_scale is None else object_scale), (c.upright if upright is None else upright)


def clip_video(engine, spec: data.ClipSpec, frames: int, source: str, side: int | None = None, codec=None,
               seed: int = 0, chunk: int = 3) -> torch.Tensor:
    """The frames a measurement reads for one caption: the procedural clip ("clips", float [3, T, H, W]), the clip
    through `codec` ("codec"), or the engine's stream of its caption ("stream"), these two uint8 [T, H, W, 3].
    `side` and `codec` default to the engine's (the native size, the model's codec), else data.SIZE."""
    side = side or (data.SIZE if engine is None else engine.default_size[0])
    if codec is None and engine is not None:
        codec = engine.components.vae
    if source == "clips":
        return data.render([spec], data.clip_times(frames), side)[0]
    if source == "codec":
        with torch.no_grad():
            clip = data.render([spec], data.clip_times(frames), side, next(codec.parameters()).device)
            return to_uint8_frames(codec.decode(codec.encode(clip)).float()).cpu()
    return stream_frames(engine, spec.caption, frames, seed=seed, chunk=chunk)


def prompt_following(engine, captions: int = 100, frames: int = 21, chunk: int = 3, source: str = "stream",
                     progress=None, codec=None, side: int | None = None, object_scale: float | None = None,
                     upright: bool | None = None, split: str = "test") -> dict:
    """Agreement of video with held-out captions (object colour, background colour, both), from `split`.

    source "stream": the engine's stream of each caption; "clips": the procedural clips themselves;
    "codec": the clips encoded and decoded by `codec` (default: the engine's), the ceiling of any DiT
    that decodes through it. `engine` may be None for "clips", and for "codec" when `codec` is given.
    The clips' objects are drawn at `object_scale` and `upright` (default: as the engine's model was trained,
    else 1 and random angles).
    """
    if source not in SOURCES:
        raise ValueError(f"source {source!r}: expected one of {SOURCES}")
    progress = progress or Progress(enabled=False)
    rows = []
    for j, spec in enumerate(held_out_specs(captions, *_drawing(engine, object_scale, upright), split=split)):
        video = clip_video(engine, spec, frames, source, side, codec, seed=j, chunk=chunk)
        per_frame = data.dominant_colours(video)
        obj, bg = data.majority(per_frame), data.background_colour_of_clip(video)
        ok_obj, ok_bg = _agrees(spec.description, obj, bg)
        # frame by frame too: a clip's vote hides whether its object shows early and then fades
        shown = [c in spec.description.colours for c in per_frame[:frames]]
        rows.append({"caption": spec.caption, "object": obj, "background": bg, "object_ok": ok_obj,
                     "background_ok": ok_bg, "object_frames": shown})
        if (j + 1) % 10 == 0:
            progress(f"prompt following ({source}): {j + 1}/{captions} captions, object colour agrees on "
                     f"{sum(r['object_ok'] for r in rows)}")
    n = len(rows)
    return {
        "captions": n, "frames_per_caption": frames, "source": source, "split": split,
        "object_colour": sum(r["object_ok"] for r in rows) / n,
        "background_colour": sum(r["background_ok"] for r in rows) / n,
        "both": sum(r["object_ok"] and r["background_ok"] for r in rows) / n,
        "object_frames": sum(sum(r["object_frames"]) for r in rows) / sum(len(r["object_frames"]) for r in rows),
        "object_frames_by_index": [sum(r["object_frames"][i] for r in rows if i < len(r["object_frames"]))
                                   for i in range(frames)],
        "rows": rows,
    }


def shape_following(engine, reader, captions: int = 100, frames: int = 21, chunk: int = 3, source: str = "stream",
                    progress=None, object_scale: float | None = None, split: str = "test") -> dict:
    """How often the shape `reader` (shapes.ShapeReader) reads in a clip's frames is its caption's, on held-out
    single-object captions: a majority vote over the frames where the object's colour shows. Sources as
    `prompt_following`; "clips" is the ceiling the reader itself allows."""
    from .shapes import single_object_specs

    if source not in SOURCES:
        raise ValueError(f"source {source!r}: expected one of {SOURCES}")
    progress = progress or Progress(enabled=False)
    rows, truths = [], []
    for j, spec in enumerate(single_object_specs(split_start(split), captions, *_drawing(engine, object_scale))):
        video = clip_video(engine, spec, frames, source, seed=j, chunk=chunk)
        truth = spec.instances[0]
        truths.append(truth.shape)
        masks = [data.object_mask(f, truth.colour) for f in data.frames_of(video)[:frames]]
        read = [reader.read_mask(m) for m in masks]
        shape = data.majority(read)
        rows.append({"caption": spec.caption, "shape": shape, "ok": shape == truth.shape, "motion": truth.motion,
                     "frames_read": sum(r is not None for r in read),
                     "frames_ok": sum(r == truth.shape for r in read), "read": read,
                     # the caption names one object: several blobs of its colour are a count error (and the
                     # reader, cropping around all of them, cannot read their shape)
                     "pieces": [data.pieces(m) for m in masks]})
        if (j + 1) % 20 == 0:
            progress(f"shape following ({source}): {j + 1}/{captions} captions, shape agrees on "
                     f"{sum(r['ok'] for r in rows)}")
    n = len(rows)
    read = sum(r["frames_read"] for r in rows)
    return {"captions": n, "frames_per_caption": frames, "source": source, "split": split,
            "shape": sum(r["ok"] for r in rows) / n,
            "frames_ok": sum(r["frames_ok"] for r in rows) / max(read, 1),
            # frame i's share of captions read right: whether the first chunk's outline holds in the later ones
            "frames_ok_by_index": [sum(i < len(r["read"]) and r["read"][i] == truth
                                       for r, truth in zip(rows, truths)) / n for i in range(frames)],
            "one_piece": sum(c == 1 for r in rows for c in r["pieces"]) / max(
                sum(c >= 1 for r in rows for c in r["pieces"]), 1),
            # [right, captions] per kind of motion ("moving" for the four directions): rotating objects are
            # where the shipped model misses most (README)
            "by_motion": {m: [sum(r["ok"] for r in rows if _motion_kind(r["motion"]) == m),
                              sum(_motion_kind(r["motion"]) == m for r in rows)]
                          for m in sorted({_motion_kind(r["motion"]) for r in rows})},
            "rows": rows}


def _motion_kind(motion: str) -> str:
    return "moving" if motion.startswith("moving") else motion


def coherence(engine, caption: str, frames: int = 1000, seed: int = 0, chunk: int = 3, progress=None) -> dict:
    """One long stream, summarised per chunk, first fifth against last fifth."""
    progress = progress or Progress(enabled=False)
    desc = data.describe(caption)
    stream = engine.stream(caption, seed=seed, chunk=chunk)
    per_chunk, previous, have, warnings, finite = [], None, 0, 0, True
    while have < frames:
        c = stream.next()
        f = c.frames.float() / 255.0
        warnings += len(c.warnings)
        finite &= bool(torch.isfinite(c.latents.float()).all())
        diffs = (f[1:] - f[:-1]).abs().mean(dim=(1, 2, 3))
        if previous is not None:
            diffs = torch.cat([(f[:1] - previous).abs().mean().view(1), diffs])
        previous = f[-1:]
        per_chunk.append({"frames": int(f.shape[0]), "follows": data.dominant_colour_of_clip(c.frames) in desc.colours,
                          "contrast": float(f.std(dim=(1, 2)).mean()), "change": float(diffs.mean())})
        have += f.shape[0]
        if len(per_chunk) % 25 == 0:
            progress(f"coherence: {have}/{frames} frames")
    fifth = max(1, len(per_chunk) // 5)
    first, last = per_chunk[:fifth], per_chunk[-fifth:]

    def mean(rows, key):
        return float(np.mean([r[key] for r in rows]))

    summary = {
        "caption": caption, "frames": have, "chunks": len(per_chunk), "nan_guard_warnings": warnings,
        "finite": finite,
        "follows_first": mean(first, "follows"), "follows_last": mean(last, "follows"),
        "contrast_first": mean(first, "contrast"), "contrast_last": mean(last, "contrast"),
        "change_first": mean(first, "change"), "change_last": mean(last, "change"),
    }
    summary["collapsed"] = bool(
        not finite
        or summary["contrast_last"] < max(0.5 * summary["contrast_first"], MIN_CONTRAST)
        or summary["follows_last"] < summary["follows_first"] - 0.3
    )
    return summary


WORD_SIGMAS = (0.9, 0.7, 0.5)
SWAPS = ("colour", "shape", "background")  # which word of a single-object caption word_use replaces


def swap_word(spec: data.ClipSpec, kind: str, rng: np.random.Generator) -> str:
    """The caption with the object's colour, its shape or the background's colour replaced by another of its
    kind (never the other colour the caption names), articles fixed to match."""
    inst, desc = spec.instances[0], spec.description
    words = spec.caption.split()
    if kind == "shape":
        old, pool = inst.shape, [s for s in data.SHAPES if s != inst.shape]
        at = words.index(old)
    else:
        old = inst.colour if kind == "colour" else desc.background_colour
        pool = [c for c in data.COLOURS if c not in (inst.colour, desc.background_colour)]
        at = words.index(old) if kind == "colour" else len(words) - 1 - words[::-1].index(old)
    words[at] = str(rng.choice(pool))
    if at > 0 and words[at - 1] in ("a", "an"):
        words[at - 1] = "an" if words[at][0] in "aeiou" else "a"
    return " ".join(words)


FIRST_CHUNK = 3  # latent frames: the chunk a stream draws first, from its words alone


def _first_chunk(engine, spec: data.ClipSpec, seed: int):
    """(the clip's first chunk of video frames [1, 3, T, H, W] on the host, its latents through the model's codec,
    fixed noise of their shape from `seed`): what word_use and shape_denoising noise and hand to the DiT."""
    codec = engine.components.vae
    clip = data.render([spec], data.clip_times(1 + (FIRST_CHUNK - 1) * TEMPORAL), engine.default_size[0])
    z = codec.encode(clip.to(next(codec.parameters()).device)).float()
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed)).to(z.device)
    return clip, z, noise


def word_use(engine, captions: int = 30, sigmas=WORD_SIGMAS, progress=None) -> dict:
    """How much the DiT relies on each kind of caption word. Held-out single-object clips (their first chunk,
    through the codec) are noised to each sigma with fixed noise; the error of the model's clean prediction
    (`Stream.predict_clean`) with the caption's own words is compared with the error after the object's
    colour, its shape or the background's colour is swapped for another: over the latent pixels that show
    the object (colour, shape) or only the background (background). A ratio near 1 means the model ignores
    that kind of word."""
    from .shapes import single_object_specs

    progress = progress or Progress(enabled=False)
    rng = np.random.default_rng(0)
    sums = {k: np.zeros((2, len(sigmas))) for k in ("own", *SWAPS)}  # [object, background] error per sigma
    specs = single_object_specs(HELD_OUT + 10**6, captions, *_drawing(engine, None))
    for j, spec in enumerate(specs):
        with torch.no_grad():
            clip, z, noise = _first_chunk(engine, spec, j)
            empty = data.ClipSpec(spec.seed, spec.description, (), spec.background_params)
            times = data.clip_times(clip.shape[2])
            shows = (clip - data.render([empty], times, engine.default_size[0])).abs().amax(1, keepdim=True)
            # a latent pixel shows the object when any video pixel it encodes does
            on_object = (latent_max(shows) > 0.05).float()[0, 0].to(engine.device)
            prompts = {"own": spec.caption, **{k: swap_word(spec, k, rng) for k in SWAPS}}
            for name, prompt in prompts.items():
                stream = engine.stream(prompt, chunk=FIRST_CHUNK)
                for i, sigma in enumerate(sigmas):
                    x0 = stream.predict_clean((1 - sigma) * z + sigma * noise, sigma)
                    err = (x0 - z).pow(2).mean(dim=1)[0]  # [F, h, w]
                    for m, where in enumerate((on_object, 1 - on_object)):
                        sums[name][m, i] += float((err * where).sum() / where.sum().clamp_min(1))
        if (j + 1) % 10 == 0:
            progress(f"word use: {j + 1}/{captions} captions")
    where = {"colour": 0, "shape": 0, "background": 1}  # the object's latent pixels, or the background's
    ratio = {k: (sums[k][where[k]] / sums["own"][where[k]]).round(4).tolist() for k in SWAPS}
    return {"captions": captions, "sigmas": list(sigmas), "chunk_frames": 1 + (FIRST_CHUNK - 1) * TEMPORAL,
            "error_object": {k: (v[0] / captions).tolist() for k, v in sums.items()},
            "error_background": {k: (v[1] / captions).tolist() for k, v in sums.items()},
            "ratio": ratio}


DENOISE_SIGMAS = (0.2, 0.4, 0.6, 0.8, 0.9, 0.95)


def _decoded_shape(reader, codec, latents: torch.Tensor, colour: str, skip: int = 0) -> str | None:
    """The shape reader's majority over the frames the codec decodes from `latents`, the first `skip` left out."""
    video = to_uint8_frames(codec.decode(latents.to(next(codec.parameters()).device)).float())[skip:]  # [n, H, W, 3]
    return data.majority([reader.read_mask(data.object_mask(f, colour)) for f in data.frames_of(video.cpu())])


def shape_denoising(engine, reader, captions: int = 40, sigmas=DENOISE_SIGMAS, progress=None) -> dict:
    """Per sigma, of `captions` held-out single-object clips (their first chunk, through the codec, noised with
    fixed noise): how often the shape reader reads the clip's own shape in the decoded clean prediction
    (`Stream.predict_clean`) with the caption's words (`own`), and with the shape word swapped for another,
    the clip's shape (`swapped_keeps_clip`) or the word's (`swapped_shows_word`). `codec` counts the clips
    whose shape the codec alone keeps, the ceiling of `own`."""
    from .shapes import single_object_specs

    progress = progress or Progress(enabled=False)
    codec = engine.components.vae
    rng = np.random.default_rng(0)
    counts = {k: [0] * len(sigmas) for k in ("own", "swapped_keeps_clip", "swapped_shows_word")}
    rows, kept = [], 0
    specs = single_object_specs(HELD_OUT + 2 * 10**6, captions, *_drawing(engine, None))
    for j, spec in enumerate(specs):
        truth = spec.instances[0]
        swapped = swap_word(spec, "shape", rng)
        word = data.describe(swapped).groups[0].shape
        row = {"caption": spec.caption, "shape": truth.shape, "swapped_to": word, "own": [], "swapped": []}
        with torch.no_grad():
            _, z, noise = _first_chunk(engine, spec, j)
            row["codec"] = _decoded_shape(reader, codec, z, truth.colour)
            kept += row["codec"] == truth.shape
            for name, prompt in (("own", spec.caption), ("swapped", swapped)):
                stream = engine.stream(prompt, chunk=FIRST_CHUNK)
                for i, sigma in enumerate(sigmas):
                    x0 = stream.predict_clean((1 - sigma) * z + sigma * noise, sigma)
                    read = _decoded_shape(reader, codec, x0, truth.colour)
                    row[name].append(read)
                    if name == "own":
                        counts["own"][i] += read == truth.shape
                    else:
                        counts["swapped_keeps_clip"][i] += read == truth.shape
                        counts["swapped_shows_word"][i] += read == word
        rows.append(row)
        if (j + 1) % 10 == 0:
            progress(f"shape denoising: {j + 1}/{captions} captions")
    return {"captions": captions, "sigmas": list(sigmas), "codec": kept, **counts, "rows": rows}


LATER_SIGMAS = (0.6, 0.8, 0.9)


def later_chunk_denoising(engine, reader, captions: int = 40, sigmas=LATER_SIGMAS, progress=None) -> dict:
    """What the model does with the outline a stream's second chunk shows, per sigma, on `captions` held-out
    single-object clips: the clip's first chunk (through the codec) is fed to the stream as its context
    (`Stream.feed`), and its second chunk is noised with fixed noise, from the clip itself or from its twin
    (`data.reshaped`: the same clip with another shape). The clean prediction, with the clip's own caption,
    is decoded after the first chunk and its frames read by the shape reader. From the clip's latents:
    `own_input_keeps` (the clip's shape). From the twin's: `twin_input_redraws` (the clip's shape, which the
    words and the context tell) or `twin_input_copies` (the twin's, which the noised frames show). `codec`
    counts the second chunks whose shape the codec alone keeps."""
    from .shapes import single_object_specs

    progress = progress or Progress(enabled=False)
    codec = engine.components.vae
    device = next(codec.parameters()).device
    rng = np.random.default_rng(0)
    counts = {k: [0] * len(sigmas) for k in ("own_input_keeps", "twin_input_redraws", "twin_input_copies")}
    rows, kept = [], 0
    first = 1 + (FIRST_CHUNK - 1) * TEMPORAL  # video frames of the first chunk
    times = data.clip_times(1 + (2 * FIRST_CHUNK - 1) * TEMPORAL)
    for j, spec in enumerate(single_object_specs(HELD_OUT + 3 * 10**6, captions, *_drawing(engine, None))):
        truth, twin = spec.instances[0], data.reshaped(spec, rng)
        row = {"caption": spec.caption, "shape": truth.shape, "twin": twin.instances[0].shape, "own": [],
               "twin_input": []}
        with torch.no_grad():
            z, z_twin = (codec.encode(data.render([s], times, engine.default_size[0]).to(device)).float()
                         for s in (spec, twin))
            context, later = z[:, :, :FIRST_CHUNK], z[:, :, FIRST_CHUNK:]
            noise = torch.randn(later.shape, generator=torch.Generator().manual_seed(j)).to(z.device)

            def second_chunk_shape(latents):  # decoded after the first chunk, as a stream decodes it
                return _decoded_shape(reader, codec, torch.cat([context, latents.to(device)], dim=2), truth.colour,
                                      skip=first)

            row["codec"] = second_chunk_shape(later)
            kept += row["codec"] == truth.shape
            stream = engine.stream(spec.caption, chunk=FIRST_CHUNK)
            stream.feed(context)
            for i, sigma in enumerate(sigmas):
                for name, given in (("own", later), ("twin_input", z_twin[:, :, FIRST_CHUNK:])):
                    read = second_chunk_shape(stream.predict_clean((1 - sigma) * given + sigma * noise, sigma))
                    row[name].append(read)
                    if name == "own":
                        counts["own_input_keeps"][i] += read == truth.shape
                    else:
                        counts["twin_input_redraws"][i] += read == truth.shape
                        counts["twin_input_copies"][i] += read == row["twin"]
        rows.append(row)
        if (j + 1) % 10 == 0:
            progress(f"later chunk shape denoising: {j + 1}/{captions} captions")
    return {"captions": captions, "sigmas": list(sigmas), "codec": kept, **counts, "rows": rows}


def ablation_patch(word: str) -> str:
    return (f'name = "ablate {word}"\n\n[[bend]]\nname = "ablate"\nop = "cross.gain"\ntokens = "{word}"\n'
            "gain = 0.0\n")


def colour_share(video, colour: str) -> float:
    """Mean fraction of the frames covered by objects of this colour."""
    return float(np.mean([data.colour_counts(f).get(colour, 0.0) for f in video]))


def word_ablation(engine, captions: int = 20, frames: int = 21, chunk: int = 3, progress=None) -> dict:
    """Take a colour word's cross-attention away; measure that colour's share of the frames, and mix 0."""
    from ..bends.patch import apply_patch, parse_patch

    progress = progress or Progress(enabled=False)
    unbent_patch = parse_patch('name = "unbent"\n', "<unbent>", engine.dims)
    rows, exact, changed = [], True, 0
    specs = [s for s in held_out_specs(captions * 4) if len(s.description.groups) == 1][:captions]
    for j, spec in enumerate(specs):
        word = spec.description.groups[0].colour
        apply_patch(engine, unbent_patch)
        before, z_before = stream_chunks(engine, spec.caption, frames, seed=j, chunk=chunk)
        apply_patch(engine, parse_patch(ablation_patch(word), "<ablate>", engine.dims))
        after, z_after = stream_chunks(engine, spec.caption, frames, seed=j, chunk=chunk)
        changed += not torch.equal(z_after, z_before)
        if j < 3:  # mix 0: the same bend armed but silent must give the unbent stream, bit for bit
            engine.params.set("bend/ablate/mix", 0.0)
            silent, z_silent = stream_chunks(engine, spec.caption, frames, seed=j, chunk=chunk)
            exact &= bool(torch.equal(silent, before) and torch.equal(z_silent, z_before))
        rows.append({"caption": spec.caption, "word": word, "before": colour_share(before, word),
                     "after": colour_share(after, word)})
        progress(f"ablation {j + 1}/{len(specs)}: '{word}' covers {rows[-1]['before']:.3f} -> {rows[-1]['after']:.3f}")
        # the background's colour word too (grey is what the model paints for no colour word, so it cannot go)
        ground = spec.description.background_colour
        if ground not in ("grey", "gray") and ground != word:
            apply_patch(engine, parse_patch(ablation_patch(ground), "<ablate>", engine.dims))
            after = stream_chunks(engine, spec.caption, frames, seed=j, chunk=chunk)[0]
            rows[-1].update(background=ground, background_before=background_share(before, ground),
                            background_after=background_share(after, ground))
    apply_patch(engine, unbent_patch)
    before = float(np.mean([r["before"] for r in rows]))
    after = float(np.mean([r["after"] for r in rows]))
    grounds = [r for r in rows if "background" in r]
    return {"captions": len(rows), "share_before": before, "share_after": after,
            "removed": 1.0 - after / before if before > 0 else 0.0,
            "lower_in": sum(r["after"] < r["before"] for r in rows) / len(rows),
            "changed_latents": changed / len(rows), "mix0_exact": exact,
            # of the frames whose background reads as the caption's colour, before and after ablating that word
            "background": {"captions": len(grounds),
                           "frames_before": float(np.mean([r["background_before"] for r in grounds] or [0.0])),
                           "frames_after": float(np.mean([r["background_after"] for r in grounds] or [0.0])),
                           "removed_in": sum(r["background_after"] <= 0.15 for r in grounds)},
            "rows": rows}


def background_share(video, colour: str) -> float:
    """Fraction of the frames whose background reads as this colour."""
    return float(np.mean([data.background_colour(f) == colour for f in video]))


def write_strip(engine, path: str | Path, prompts=STRIP_PROMPTS, columns: int = 6, every: int = 8,
                seed: int = 0, scale: int = 1, gap: int = 2) -> Path:
    """A PNG: a row per prompt, `columns` frames `every` frames apart from the start of each stream,
    `gap` dark pixels between tiles (before scaling)."""
    from PIL import Image

    tiles = []
    for j, prompt in enumerate(prompts):
        video = stream_frames(engine, prompt, columns * every, seed=seed + j)
        tiles.append(video[: columns * every : every].numpy())
    h, w = tiles[0].shape[1:3]
    sheet = np.full((len(prompts) * (h + gap) - gap, columns * (w + gap) - gap, 3), 24, dtype=np.uint8)
    for r, row in enumerate(tiles):
        for c, frame in enumerate(row):
            sheet[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = frame
    img = Image.fromarray(sheet)
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="a sketch model folder (default: the embedded default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--captions", type=int, default=100, help="held-out captions for prompt following")
    parser.add_argument("--split", choices=tuple(SPLITS), default="test",
                        help="which held-out captions prompt and shape following draw: choose sampling settings "
                             "on validation, quote test (default)")
    parser.add_argument("--long", type=int, default=1000, help="frames of each long stream (coherence)")
    parser.add_argument("--long-captions", type=int, default=3, help="how many long streams")
    parser.add_argument("--ablations", type=int, default=20, help="captions for the word ablation")
    parser.add_argument("--shape-frames", type=int, default=12000,
                        help="procedural frames the shape reader trains on (shape following)")
    parser.add_argument("--json", default=None, help="write every figure here")
    parser.add_argument("--strip", default=None, help="write a PNG strip of frames for a few prompts")
    parser.add_argument("--strip-scale", type=int, default=1)
    parser.add_argument("--schedule", default=None, metavar="T1,T2,T3,T4",
                        help="sample with these 4 timesteps instead of the ones the model folder names")
    parser.add_argument("--shift", type=float, default=None, help="and this shift instead of the folder's")
    parser.add_argument("--sampler", choices=("ddim", "renoise"), default=None,
                        help="and this sampler instead of the folder's")
    parser.add_argument("--object-scale", type=float, default=None,
                        help="draw the reference and codec clips' objects at this radius factor instead of the "
                             "model's (what a codec keeps of larger objects)")
    parser.add_argument("--upright", action="store_true",
                        help="draw the held-out clips' objects starting at angle 0, whatever the model was trained on")
    parser.add_argument("--denoise-captions", type=int, default=40,
                        help="held-out clips for shape denoising (--only denoising)")
    parser.add_argument("--only", default="reference,codec,following,shapes,denoising,words,coherence,ablation,strip",
                        help="which measurements, comma-separated")


def run(args) -> int:
    from ..engine.stream import Engine
    from .train import parse_schedule

    progress = Progress()
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    engine = Engine.load(args.model, device=args.device, progress=progress)
    if args.schedule is not None or args.shift is not None or args.sampler is not None:  # every stream samples so
        sampling = dict(engine.components.sampling or {})
        if args.sampler is not None:
            sampling["sampler"] = args.sampler
        if args.schedule is not None:
            sampling["schedule"] = list(parse_schedule(args.schedule))
        if args.shift is not None:
            sampling["shift"] = args.shift
        engine.components.sampling = sampling
    if args.object_scale is not None:
        if not 0.0 < args.object_scale <= data.MAX_OBJECT_SCALE:
            raise UserError(f"--object-scale {args.object_scale:g}: more than 0 and at most {data.MAX_OBJECT_SCALE:g}")
        engine.components.object_scale = args.object_scale
    if args.upright:
        engine.components.upright = True
    report = {"model": engine.components.source, "device": args.device, "size": list(engine.default_size),
              "sampling": engine.components.sampling, "object_scale": engine.components.object_scale,
              "upright": engine.components.upright, "split": args.split}
    t0 = time.perf_counter()
    if "reference" in only:
        r = report["reference"] = prompt_following(engine, args.captions, source="clips", split=args.split)
        progress(f"reference (the procedural clips themselves): object colour {r['object_colour']:.1%}, "
                 f"background {r['background_colour']:.1%}")
    if "codec" in only and isinstance(engine.components.vae, Codec):
        r = report["codec"] = prompt_following(engine, args.captions, source="codec", split=args.split)
        progress(f"the clips through the codec: object colour {r['object_colour']:.1%}, "
                 f"background {r['background_colour']:.1%}")
    if "following" in only:
        r = report["prompt_following"] = prompt_following(engine, args.captions, progress=progress, split=args.split)
        progress(f"prompt following on {r['captions']} held-out captions: object colour {r['object_colour']:.1%}, "
                 f"background {r['background_colour']:.1%}, both {r['both']:.1%}; the object's colour shows in "
                 f"{r['object_frames']:.1%} of the frames")
    reader = None
    if "shapes" in only or ("denoising" in only and isinstance(engine.components.vae, Codec)):
        from . import shapes

        reader = shapes.train(frames=args.shape_frames, progress=progress)
    if "shapes" in only:
        checked = min(1000, args.shape_frames)
        report["shape_reader"] = {"accuracy_blurred": shapes.accuracy(reader, checked),
                                  "accuracy_sharp": shapes.accuracy(reader, checked, max_blur=0.0)}
        progress(f"shape reader on held-out single-object frames: {report['shape_reader']['accuracy_sharp']:.1%} "
                 f"sharp, {report['shape_reader']['accuracy_blurred']:.1%} blurred")
        sources = ["clips", "codec", "stream"] if isinstance(engine.components.vae, Codec) else ["clips", "stream"]
        for source in sources:
            r = report[f"shape_following_{source}"] = shape_following(engine, reader, args.captions, source=source,
                                                                      progress=progress, split=args.split)
            progress(f"shape following ({source}) on {r['captions']} single-object held-out captions: "
                     f"{r['shape']:.1%} (frame by frame {r['frames_ok']:.1%} of the frames the object shows in; "
                     f"one piece in {r['one_piece']:.1%} of them); by motion: "
                     + ", ".join(f"{m} {ok}/{n}" for m, (ok, n) in r["by_motion"].items())
                     + "; read right frame by frame index: " + " ".join(f"{x:.0%}" for x in r["frames_ok_by_index"]))
    if "words" in only and isinstance(engine.components.vae, Codec):
        r = report["word_use"] = word_use(engine, min(args.captions, 30), progress=progress)
        progress("word use (error with the word swapped / with the caption's own, at sigma "
                 + ", ".join(f"{s:g}" for s in r["sigmas"]) + "): "
                 + "; ".join(f"{k} " + ", ".join(f"{x:.2f}" for x in v) for k, v in r["ratio"].items()))
    if "denoising" in only and isinstance(engine.components.vae, Codec):
        r = report["shape_denoising"] = shape_denoising(engine, reader, args.denoise_captions, progress=progress)
        n = r["captions"]
        progress(f"shape denoising ({n} clips, the codec alone keeps {r['codec']}), at sigma "
                 + ", ".join(f"{s:g}" for s in r["sigmas"]) + ": own word keeps the shape "
                 + ", ".join(map(str, r["own"])) + "; another word: keeps it "
                 + ", ".join(map(str, r["swapped_keeps_clip"])) + ", shows the word's "
                 + ", ".join(map(str, r["swapped_shows_word"])))
        r = report["later_chunk_denoising"] = later_chunk_denoising(engine, reader, args.denoise_captions,
                                                                    progress=progress)
        progress(f"later chunk shape denoising ({r['captions']} clips, the first chunk fed as context; the codec "
                 f"alone keeps {r['codec']}), at sigma " + ", ".join(f"{s:g}" for s in r["sigmas"])
                 + ": from the clip, its shape kept " + ", ".join(map(str, r["own_input_keeps"]))
                 + "; from its twin, the clip's shape redrawn " + ", ".join(map(str, r["twin_input_redraws"]))
                 + ", the twin's copied " + ", ".join(map(str, r["twin_input_copies"])))
    if "coherence" in only:
        report["coherence"] = []
        for j, spec in enumerate(held_out_specs(args.long_captions)):
            c = coherence(engine, spec.caption, args.long, seed=j, progress=progress)
            report["coherence"].append(c)
            progress(f"coherence over {c['frames']} frames: follows {c['follows_first']:.0%} -> {c['follows_last']:.0%}, "
                     f"contrast {c['contrast_first']:.3f} -> {c['contrast_last']:.3f}, "
                     f"{'COLLAPSED' if c['collapsed'] else 'no collapse'}")
    if "ablation" in only:
        a = report["word_ablation"] = word_ablation(engine, args.ablations, progress=progress)
        progress(f"word ablation: colour share {a['share_before']:.3f} -> {a['share_after']:.3f} "
                 f"({a['removed']:.0%} removed, lower in {a['lower_in']:.0%}); mix 0 exact: {a['mix0_exact']}")
        g = a["background"]
        progress(f"background word ablation on {g['captions']} captions: the background reads as its colour in "
                 f"{g['frames_before']:.0%} -> {g['frames_after']:.0%} of the frames; gone in {g['removed_in']}")
    if "strip" in only and args.strip:
        progress(f"strip written to {write_strip(engine, args.strip, scale=args.strip_scale)}")
    report["seconds"] = round(time.perf_counter() - t0, 1)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        progress(f"figures written to {args.json}")
    return 0


def main(argv=None) -> int:
    return module_main("python -m instrument.sketch.evaluate", __doc__, configure, run, argv)


if __name__ == "__main__":
    sys.exit(main())
