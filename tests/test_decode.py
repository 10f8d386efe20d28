"""Frame decoders: streaming Wan VAE and TAEHV, checked against one-shot and per-frame references."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import AutoencoderKLWan
from torch import nn

from instrument.cli import UserError
from instrument.engine.taehv import TAEHV, MemBlock, TAEHVStreamingDecoder, TGrow, TPool
from instrument.engine.vae import WanStreamingDecoder, to_uint8_frames

CHUNKINGS = [[1, 1, 1, 1, 1, 1, 1], [1, 3, 3], [3, 3, 1], [3, 1, 3]]


def stream(decoder, latents: torch.Tensor, chunks: list[int], as_uint8: bool = False) -> list[torch.Tensor]:
    decoder.reset()
    out, start = [], 0
    for size in chunks:
        piece = latents[:, :, start : start + size]
        out.append(decoder.decode(piece) if as_uint8 else decoder.decode_float(piece))
        start += size
    assert start == latents.shape[2]
    return out


def expected_counts(chunks: list[int]) -> list[int]:
    return [4 * f - (3 if i == 0 else 0) for i, f in enumerate(chunks)]


def assert_not_saturated(frames: torch.Tensor) -> None:
    # A reference that is mostly clamped to 0 or 1 would hide differences.
    inside = ((frames > 0.02) & (frames < 0.98)).float().mean().item()
    assert inside > 0.8 and frames.std().item() > 0.05


# ---------------------------------------------------------------- Wan VAE


@pytest.fixture(scope="module")
def wan_vae() -> AutoencoderKLWan:
    torch.manual_seed(1234)
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1)
    with torch.no_grad():  # default init leaves norm gains at 1 and biases at 0: vary them too
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae.eval()


def diffusers_reference(vae: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    """What the diffusers Wan pipeline does with the DiT's latents, as [0, 1] frames."""
    cfg = vae.config
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        video = vae.decode(latents / inv_std + mean).sample
    return (video + 1) / 2


@pytest.mark.parametrize("chunks", CHUNKINGS)
def test_wan_streaming_equals_one_shot_decode(wan_vae, chunks):
    torch.manual_seed(len(chunks) * 7 + chunks[0])
    latents = torch.randn(1, 16, sum(chunks), 3, 5)
    reference = diffusers_reference(wan_vae, latents)
    assert_not_saturated(reference)
    decoder = WanStreamingDecoder(wan_vae)
    pieces = stream(decoder, latents, chunks)
    assert [p.shape[2] for p in pieces] == expected_counts(chunks)
    video = torch.cat(pieces, 2)
    assert video.shape == reference.shape == (1, 3, 1 + 4 * (sum(chunks) - 1), 24, 40)
    assert (video - reference).abs().max().item() < 1e-4


def test_wan_uint8_frames_and_reset(wan_vae):
    torch.manual_seed(5)
    latents = torch.randn(1, 16, 4, 2, 3)
    decoder = WanStreamingDecoder(wan_vae)
    assert (decoder.spatial_stride, decoder.temporal_stride) == (8, 4)
    assert decoder.device == torch.device("cpu")
    first = stream(decoder, latents, [1, 3], as_uint8=True)
    again = stream(decoder, latents, [1, 3], as_uint8=True)  # stream() resets first
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    frames = torch.cat(first)
    assert frames.dtype == torch.uint8 and frames.shape == (13, 16, 24, 3)
    reference = diffusers_reference(wan_vae, latents)[0].permute(1, 2, 3, 0) * 255
    # Rounding may land on the other side of .5 where the float paths differ by ~1e-6.
    assert (frames.float() - reference).abs().max().item() <= 0.5 + 1e-3


def test_wan_refuses_size_change_and_bad_shapes(wan_vae):
    decoder = WanStreamingDecoder(wan_vae)
    decoder.decode_float(torch.randn(1, 16, 1, 2, 2))
    with pytest.raises(ValueError, match="reset"):
        decoder.decode_float(torch.randn(1, 16, 3, 2, 3))
    decoder.reset()
    decoder.decode_float(torch.randn(1, 16, 3, 2, 3))
    with pytest.raises(ValueError, match="16"):
        decoder.decode_float(torch.randn(1, 8, 3, 2, 3))
    with pytest.raises(ValueError, match="batch"):
        WanStreamingDecoder(wan_vae).decode(torch.randn(2, 16, 1, 2, 2))


def test_to_uint8_frames_layout():
    video = torch.rand(1, 3, 2, 4, 5, dtype=torch.float64)
    expected = (video[0].permute(1, 2, 3, 0) * 255).round().to(torch.uint8)
    frames = to_uint8_frames(video.clone())
    assert frames.is_contiguous() and torch.equal(frames, expected)


# ---------------------------------------------------------------- TAEHV


def published_keys() -> set[str]:
    """Key names of taew2_1.pth, listed from the layer indices of madebyollin/taehv's TAEHV."""
    memblock = ["conv.0.weight", "conv.0.bias", "conv.2.weight", "conv.2.bias", "conv.4.weight", "conv.4.bias"]
    keys = {"encoder.0.weight", "encoder.0.bias", "encoder.17.weight", "encoder.17.bias"}
    keys |= {f"encoder.{i}.conv.weight" for i in (2, 7, 12)}  # TPool
    keys |= {f"encoder.{i}.weight" for i in (3, 8, 13)}  # strided convs, no bias
    keys |= {f"encoder.{i}.{k}" for i in (4, 5, 6, 9, 10, 11, 14, 15, 16) for k in memblock}
    keys |= {"decoder.1.weight", "decoder.1.bias", "decoder.22.weight", "decoder.22.bias"}
    keys |= {f"decoder.{i}.conv.weight" for i in (7, 13, 19)}  # TGrow
    keys |= {f"decoder.{i}.weight" for i in (8, 14, 20)}  # convs after TGrow, no bias
    keys |= {f"decoder.{i}.{k}" for i in (3, 4, 5, 9, 10, 11, 15, 16, 17) for k in memblock}
    return keys


def lively_taehv(seed: int) -> TAEHV:
    """Random TAEHV whose activations neither vanish nor saturate the output (unit-gain init, output rescaled)."""
    torch.manual_seed(seed)
    model = TAEHV()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups
                m.weight.normal_(0, math.sqrt(1.0 / fan_in))
                if m.bias is not None:
                    m.bias.normal_(0, 0.05)
        # Calibrate the last conv so the output spreads around 0.5 instead of clamping.
        out = model.decoder[-1]
        hidden = _last_hidden(model, torch.randn(1, 16, 2, 3, 3))
        out.weight.mul_(0.2 / nn.functional.conv2d(hidden, out.weight, padding=1).std().item())
        out.bias.fill_(0.5)
    return model.eval()


def _last_hidden(model: TAEHV, latents: torch.Tensor) -> torch.Tensor:
    from instrument.engine.taehv import run_with_memory

    x = latents.transpose(1, 2).flatten(0, 1)
    return run_with_memory(model.decoder[:-1], x, 1)


def reference_apply(layers: nn.Sequential, frames: list[torch.Tensor]) -> list[torch.Tensor]:
    """The original's sequential semantics: one frame at a time, depth first, in causal order."""
    memory: dict[int, torch.Tensor] = {}
    pooled: dict[int, list[torch.Tensor]] = {}
    out: list[torch.Tensor] = []

    def visit(x: torch.Tensor, i: int) -> None:
        if i == len(layers):
            out.append(x)
            return
        layer = layers[i]
        if isinstance(layer, MemBlock):
            past = memory.get(i, torch.zeros_like(x))
            memory[i] = x
            visit(layer(x, past), i + 1)
        elif isinstance(layer, TPool):
            pooled.setdefault(i, []).append(x)
            if len(pooled[i]) == layer.stride:
                visit(layer.conv(torch.cat(pooled.pop(i), 1)), i + 1)
        elif isinstance(layer, TGrow):
            for part in layer.conv(x).chunk(layer.stride, 1):
                visit(part, i + 1)
        else:
            visit(layer(x), i + 1)

    for frame in frames:
        visit(frame, 0)
    return out


@pytest.fixture(scope="module")
def taehv() -> TAEHV:
    return lively_taehv(99)


def test_taehv_key_layout_is_the_published_one():
    model = TAEHV()
    state = model.state_dict()
    assert set(state) == published_keys()
    shapes = {
        "encoder.0.weight": (64, 3, 3, 3),
        "encoder.2.conv.weight": (64, 128, 1, 1),
        "encoder.12.conv.weight": (64, 64, 1, 1),
        "encoder.17.weight": (16, 64, 3, 3),
        "decoder.1.weight": (256, 16, 3, 3),
        "decoder.3.conv.0.weight": (256, 512, 3, 3),
        "decoder.7.conv.weight": (256, 256, 1, 1),
        "decoder.13.conv.weight": (256, 128, 1, 1),
        "decoder.19.conv.weight": (128, 64, 1, 1),
        "decoder.20.weight": (64, 64, 3, 3),
        "decoder.22.weight": (3, 64, 3, 3),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert (model.t_upscale, model.t_downscale, model.frames_to_trim) == (4, 4, 3)
    decoder_params = sum(p.numel() for p in model.decoder.parameters())
    assert 5e6 < decoder_params < 15e6  # "~10M-parameter decoder"


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_taehv_loads_saved_weights(tmp_path, taehv, suffix):
    path = tmp_path / f"taew2_1{suffix}"
    state = {k: v.clone() for k, v in taehv.state_dict().items()}
    if suffix == ".pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    loaded = TAEHV.from_file(path)
    assert loaded.encoder is not None and not loaded.training
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key
    streaming = TAEHVStreamingDecoder.from_file(path)
    latents = torch.randn(1, 16, 2, 2, 2)
    assert torch.equal(streaming.decode_float(latents), TAEHVStreamingDecoder(taehv).decode_float(latents))


def test_the_engine_decodes_with_the_taehv_file_it_is_given(tmp_path, taehv):
    """--decoder tiny --tiny-decoder FILE through Engine.load: the file's weights, in float32 on the CPU (half
    precision on a GPU, tests/test_gpu.py), decoding the stream's latents as the same TAEHV does directly."""
    from safetensors.torch import save_file

    from instrument.engine.stream import Engine

    path = tmp_path / "taew2_1.safetensors"
    save_file({k: v.clone() for k, v in taehv.state_dict().items()}, str(path))
    engine = Engine.load(None, device="cpu", decoder="tiny", tiny_decoder=str(path), progress=lambda m: None)
    decoder = engine.make_decoder()
    assert decoder.dtype == torch.float32
    for key, value in decoder.model.state_dict().items():
        assert torch.equal(value, taehv.state_dict()[key]), key
    chunk = engine.stream("a red circle moving left over a blue plain background", seed=2, chunk=3).next()
    direct = TAEHVStreamingDecoder(taehv)
    assert torch.equal(chunk.frames.cpu(), direct.decode(chunk.latents))
    with pytest.raises(UserError, match="--tiny-decoder FILE"):
        Engine.load(None, device="cpu", decoder="tiny", progress=lambda m: None)


def test_taehv_decoder_only_file(tmp_path, taehv):
    path = tmp_path / "decoder_only.pth"
    torch.save({k: v for k, v in taehv.state_dict().items() if k.startswith("decoder.")}, path)
    model = TAEHV.from_file(path)
    assert model.encoder is None
    with pytest.raises(RuntimeError, match="encoder"):
        model.encode_video(torch.rand(1, 3, 4, 16, 16))


@pytest.mark.parametrize("chunks", CHUNKINGS)
def test_taehv_streaming_equals_whole_video_and_reference(taehv, chunks):
    torch.manual_seed(sum(chunks) * 13 + chunks[0])
    latents = torch.randn(1, 16, sum(chunks), 2, 3)
    decoder = TAEHVStreamingDecoder(taehv)
    assert (decoder.spatial_stride, decoder.temporal_stride) == (8, 4)
    pieces = stream(decoder, latents, chunks)
    assert [p.shape[2] for p in pieces] == expected_counts(chunks)
    video = torch.cat(pieces, 2)
    with torch.no_grad():
        whole = taehv.decode_video(latents)
        reference_model = lively_taehv(99).double()
        frames = reference_apply(reference_model.decoder, list(latents.double().unbind(2)))
    reference = torch.stack(frames[3:], 2).clamp(0, 1)
    assert_not_saturated(reference)
    assert video.shape == whole.shape == reference.shape == (1, 3, 1 + 4 * (sum(chunks) - 1), 16, 24)
    assert (video - whole).abs().max().item() < 1e-5
    assert (video.double() - reference).abs().max().item() < 1e-4


def test_taehv_uint8_and_reset(taehv):
    latents = torch.randn(1, 16, 4, 2, 2)
    decoder = TAEHVStreamingDecoder(taehv)
    first = stream(decoder, latents, [1, 3], as_uint8=True)
    again = stream(decoder, latents, [1, 3], as_uint8=True)
    decoder.graphs = True  # CUDA graphs for the steady chunk: inert on a CPU
    graphed = stream(decoder, latents, [1, 3], as_uint8=True)
    assert decoder.captures == 0
    for a, b, c in zip(first, again, graphed):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert [f.shape for f in first] == [(1, 16, 16, 3), (12, 16, 16, 3)]
    with torch.no_grad():
        whole = taehv.decode_video(latents)[0].permute(1, 2, 3, 0) * 255
    assert (torch.cat(first).float() - whole).abs().max().item() <= 0.5 + 1e-3
    with pytest.raises(ValueError, match="reset"):
        decoder.decode(torch.randn(1, 16, 1, 3, 2))


def test_taehv_compiled_streams_the_eager_frames(taehv):
    """The engine compiles the tiny decoder with its own torch.compile backend: chunk by chunk, through a reset
    and a size change, the compiled decoder's frames are the eager decoder's (its temporal memory, updated in
    place inside the compiled function, carries across chunks), and it compiles once per chunk shape. The
    backend here is aot_eager (dynamo's tracing and functionalised in-place updates, as inductor gets them;
    inductor on the CPU takes a minute to compile): tests/test_gpu.py runs inductor on the GPU."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    eager, compiled = TAEHVStreamingDecoder(taehv), TAEHVStreamingDecoder(taehv)
    said = []
    compiled.compile, compiled.progress = counter, said.append
    for size in ((2, 3), (2, 3), (3, 2)):
        latents = torch.randn(1, 16, 7, *size)
        want, got = stream(eager, latents, [3, 3, 1]), stream(compiled, latents, [3, 3, 1])
        for a, b in zip(want, got):
            assert a.shape == b.shape
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
        assert_not_saturated(torch.cat(want, 2))
    assert counter.frame_count == 4  # chunks of 3 and of 1 latent frames, at each of the two sizes
    assert said == ["tiny decoder: compiling with torch.compile on its first chunk"]


def test_the_engine_compiles_its_tiny_decoder_with_its_own_backend(tmp_path, taehv):
    """Engine.make_decoder hands the tiny decoder the pass runner's compile backend and the engine's progress:
    a compiled engine's stream decodes the eager engine's frames; an engine that does not compile leaves the
    decoder eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from instrument.engine.graphs import PassRunner
    from instrument.engine.stream import Engine

    from safetensors.torch import save_file

    path = tmp_path / "taew2_1.safetensors"
    save_file({k: v.clone() for k, v in taehv.state_dict().items()}, str(path))
    frames = {}
    for compiled in (False, True):
        engine = Engine.load(None, device="cpu", decoder="tiny", tiny_decoder=str(path), progress=lambda m: None)
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")
        if compiled:
            engine.runner = PassRunner(engine.dit, "cpu", compile=True, graphs=False, backend=counter)
        stream = engine.stream("a red circle moving left over a blue plain background", seed=4, chunk=3)
        frames[compiled] = torch.cat([stream.next().frames for _ in range(3)]).float()
        assert engine._decoder.compile is (counter if compiled else None)
        assert (engine._decoder._compiled is not None) == compiled
        assert engine._decoder.progress is engine.progress
        engine.dit.run_block = engine.dit.block
        torch._dynamo.reset()
    assert frames[True].shape == frames[False].shape and frames[False].std() > 5
    assert (frames[True] - frames[False]).abs().max() <= 1


def test_taehv_falls_back_to_eager_when_compiling_fails(taehv):
    """A compiler failure on the first chunk (a missing C compiler, an unsupported op) must not stop the show:
    a message, then the eager decoder's frames, and no further attempt."""
    calls = []

    def broken(gm, example_inputs):
        calls.append(1)
        raise RuntimeError("no compiler on this machine")

    torch._dynamo.reset()
    latents = torch.randn(1, 16, 4, 2, 3)
    decoder, said = TAEHVStreamingDecoder(taehv), []
    decoder.compile, decoder.progress = broken, said.append
    got = stream(decoder, latents, [1, 3])
    want = stream(TAEHVStreamingDecoder(taehv), latents, [1, 3])
    decoder.compile = broken  # as the engine sets it again for its next stream
    again = stream(decoder, latents, [1, 3])
    for a, b, c in zip(want, got, again):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert len(calls) == 1  # never tried again
    assert len(said) == 2 and "torch.compile failed" in said[1] and "no compiler on this machine" in said[1]


def test_taehv_encoder_matches_reference(taehv):
    frames = torch.rand(1, 3, 7, 16, 24)
    with torch.no_grad():
        latents = taehv.encode_video(frames)
        reference_model = lively_taehv(99).double()
        padded = torch.cat([frames, frames[:, :, -1:]], 2).double()  # padded to 8 with the last frame
        reference = torch.stack(reference_apply(reference_model.encoder, list(padded.unbind(2))), 2)
    assert latents.shape == (1, 16, 2, 2, 3)
    assert latents.std().item() > 1e-3
    assert (latents.double() - reference).abs().max().item() < 1e-4


def test_taehv_bad_files(tmp_path, taehv):
    missing = tmp_path / "nowhere" / "taew2_1.pth"
    with pytest.raises(UserError, match="no such file") as e:
        TAEHV.from_file(missing)
    assert str(missing) in str(e.value) and "\n" not in str(e.value)

    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    with pytest.raises(UserError, match="not a PyTorch weights file") as e:
        TAEHV.from_file(text)
    assert str(text) in str(e.value) and "\n" not in str(e.value)

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(UserError, match="not a safetensors file"):
        TAEHVStreamingDecoder.from_file(junk)

    listing = tmp_path / "list.pth"
    torch.save([1, 2, 3], listing)
    with pytest.raises(UserError, match="not a state dict"):
        TAEHV.from_file(listing)

    wrong_keys = tmp_path / "other.pth"
    torch.save({"model.weight": torch.zeros(3)}, wrong_keys)
    with pytest.raises(UserError, match="missing keys.*unexpected key") as e:
        TAEHV.from_file(wrong_keys)
    assert str(wrong_keys) in str(e.value) and "taew2_1" in str(e.value)

    # taew2_2 has the same layout with 48 latent channels: a shape, not a key, is wrong.
    state = taehv.state_dict()
    state["decoder.1.weight"] = torch.zeros(256, 48, 3, 3)
    wrong_shape = tmp_path / "taew2_2.pth"
    torch.save(state, wrong_shape)
    with pytest.raises(UserError, match=r"decoder\.1\.weight has shape \[256, 48, 3, 3\], expected \[256, 16, 3, 3\]"):
        TAEHV.from_file(wrong_shape)


def test_taehv_accepts_wider_tgrow_weights(tmp_path, taehv):
    # The original trims a TGrow trained with more output frames to its last frame's channels.
    state = {k: v.clone() for k, v in taehv.state_dict().items()}
    state["decoder.7.conv.weight"] = torch.cat([torch.randn(256, 256, 1, 1), state["decoder.7.conv.weight"]])
    path = tmp_path / "wide.pth"
    torch.save(state, path)
    loaded = TAEHV.from_file(path)
    assert torch.equal(loaded.decoder[7].conv.weight, taehv.decoder[7].conv.weight)
