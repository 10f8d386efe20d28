"""The streaming engine against references: diffusers' own forward, and a float64 block-causal forward."""

import copy

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from instrument.engine.default import build_tokenizer
from instrument.engine.dit import KVCache, StreamingDiT, TokenGrid, rope_tables
from instrument.engine.loading import Components
from instrument.engine.stream import Engine, warp


def tiny_transformer(seed, layers=2, text_dim=64):
    g = torch.Generator().manual_seed(seed)
    # The weights are a function of the seed alone: diffusers' own init draws from the global generator, whose
    # state depends on which tests ran before (in test_bends' rig a shipped patch moved the picture by 0.98 to
    # 2.8 levels across such states, against the 1 level its test asks).
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        m = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=24, text_dim=text_dim, freq_dim=32,
                                  ffn_dim=96, num_layers=layers, rope_max_seq_len=64).eval()
    with torch.no_grad():  # lift the weights off their init so every path carries signal
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m.requires_grad_(False)


def tiny_engine(transformer, chunk=3, sink=3, window=6, size=(64, 48)):
    from transformers import UMT5Config, UMT5EncoderModel

    from instrument.engine.default import TEXT_ENCODER, VAE
    from diffusers import AutoencoderKLWan

    tok = build_tokenizer()
    torch.manual_seed(5)
    te = UMT5EncoderModel(UMT5Config(vocab_size=len(tok), **TEXT_ENCODER)).eval()
    vae = AutoencoderKLWan(**VAE).eval()
    comps = Components(transformer, vae, te, tok, 16, "test")
    engine = Engine(comps, "cpu", torch.float32)
    return engine, dict(size=size, chunk=chunk, sink=sink, window=window)


def test_first_chunk_matches_diffusers_forward():
    m = tiny_transformer(1)
    x = torch.randn(1, 16, 3, 8, 12)
    t = torch.tensor([812.5])
    text = torch.randn(1, 16, 64)
    ref = m(x, t, text, return_dict=False)[0]
    dit = StreamingDiT(m)
    grid = TokenGrid(3, 4, 6)
    cache = KVCache(2, 1, 2, 24, grid.per_frame, sink=3, window=6, device="cpu", dtype=torch.float32)
    cache.place(0, 3)
    out = dit(x, t, dit.prompt_context(text), cache, rope_tables(grid, 0, 24), step=0)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


class MaskedProcessor:
    """diffusers' own attention, with a fixed boolean mask for self-attention."""

    def __init__(self, mask):
        self.mask = mask
        self.inner = WanAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        mask = self.mask if encoder_hidden_states is None else None
        return self.inner(attn, hidden_states, encoder_hidden_states, mask, rotary_emb)


def block_causal_mask(frames, chunk, sink, window, tpf):
    """Query frame q (in chunk c) sees key frame g iff g ends no later than c and g is in the sink or window."""
    allowed = torch.zeros(frames, frames, dtype=torch.bool)
    for q in range(frames):
        end = (q // chunk + 1) * chunk
        for g in range(frames):
            allowed[q, g] = g < end and (g < sink or g >= end - window)
    return allowed.repeat_interleave(tpf, 0).repeat_interleave(tpf, 1)


@pytest.mark.parametrize("chunk,sink,window,chunks", [(3, 3, 6, 5), (1, 1, 2, 6)])
def test_stream_matches_block_causal_forward_in_float64(chunk, sink, window, chunks):
    """Every denoising pass of every chunk equals one float64 forward over the whole sequence so far.

    Past chunks enter the reference as their clean latents at t = 0 (what the clean pass cached), the
    current chunk as the noisy input at its step's timestep; the mask is block-causal with the sink and
    the rolling window, so later chunks exercise eviction.
    """
    m = tiny_transformer(2)
    engine, kw = tiny_engine(copy.deepcopy(m), **dict(chunk=chunk, sink=sink, window=window))
    stream = engine.stream("a red circle", seed=7, **kw)

    passes = []
    original = engine.dit.forward

    def recording(latents, timestep, prompt, cache, rope, step):
        v = original(latents, timestep, prompt, cache, rope, step)
        passes.append((latents.clone(), float(timestep[0]), v.clone(), step))
        return v

    engine.dit.forward = recording
    clean = []
    for _ in range(chunks):
        passes.clear()
        c = stream.next()
        clean.append(c.latents)
        denoise = [p for p in passes if p[3] >= 0]
        assert len(denoise) == 4
        ref_model = copy.deepcopy(m).double()
        text = stream.prompt.embeddings.double()
        past = torch.cat(clean[:-1], dim=2).double() if len(clean) > 1 else None
        frames = len(clean) * chunk
        tpf = stream.grid.per_frame
        ref_model.set_attn_processor(MaskedProcessor(block_causal_mask(frames, chunk, sink, window, tpf)))
        for latents, t, v, _ in denoise:
            seq = latents.double() if past is None else torch.cat([past, latents.double()], dim=2)
            ts = torch.full((1, frames * tpf), t, dtype=torch.float64)
            ts[:, : (frames - chunk) * tpf] = 0.0
            ref = ref_model(seq, ts, text, return_dict=False)[0][:, :, -chunk:]
            torch.testing.assert_close(v.double(), ref, rtol=1e-4, atol=1e-4)


def test_schedule_is_the_warped_four_steps():
    assert [round(warp(t) * 1000, 1) for t in (1000, 750, 500, 250)] == [1000.0, 937.5, 833.3, 625.0]


def test_same_seed_same_frames_and_memory_stays_flat():
    engine, kw = tiny_engine(tiny_transformer(3), chunk=1, sink=1, window=2)
    a = engine.stream("a blue square", seed=11, **kw)
    b = engine.stream("a blue square", seed=11, **kw)
    ptr = (a.cache.k.data_ptr(), a.cache.v.data_ptr(), a.latent_ring.data_ptr())
    for i in range(8):
        fa, fb = a.next().frames, b.next().frames
        assert torch.equal(fa, fb)
        assert fa.shape == ((1 if i == 0 else 4), 48, 64, 3)
    assert (a.cache.k.data_ptr(), a.cache.v.data_ptr(), a.latent_ring.data_ptr()) == ptr
    assert a.cache.valid_tokens == a.cache.slots * a.cache.tokens_per_frame
    c = engine.stream("a blue square", seed=12, **kw)
    assert not torch.equal(c.next().frames, engine.stream("a blue square", seed=11, **kw).next().frames)


def test_warm_up_streams_until_the_steady_chunk_and_the_stream_plays_on_from_there():
    """play warms up before the show and plays on: warm-up is ordinary streaming, nothing skipped or changed."""
    engine, kw = tiny_engine(tiny_transformer(6), chunk=1, sink=1, window=2)
    said = []
    warmed = engine.stream("a blue square", seed=4, **kw)
    chunks = warmed.warm_up(said.append)
    assert warmed.cache.full and chunks == 2 + 3 and len(said) == chunks and "warm-up chunk 5 of about 5" in said[-1]
    fresh = engine.stream("a blue square", seed=4, **kw)
    for _ in range(chunks):
        fresh.next()
    for _ in range(3):
        assert torch.equal(warmed.next().frames, fresh.next().frames)


def test_prompt_blend_and_switch():
    engine, kw = tiny_engine(tiny_transformer(4))
    s = engine.stream("a red circle", seed=1, **kw)
    s.next()
    ctx_a = [k.clone() for k in s.context.k]
    s.set_prompt("a green star", slot=1)
    engine.params.set("prompt/blend", 0.0)
    s._update_context()
    assert all(torch.equal(x, y) for x, y in zip(ctx_a, s.context.k))
    engine.params.set("prompt/blend", 1.0)
    s._update_context()
    ref = engine.dit.prompt_context(s.prompts[1].embeddings)
    assert all(torch.equal(x, y) for x, y in zip(ref.k, s.context.k))
    # A switch of prompt A re-encodes the cached window: the cache changes before the next chunk starts.
    engine.params.set("prompt/blend", 0.0)
    before = s.cache.k.clone()
    s.set_prompt("a yellow triangle")
    s._update_context()
    s._recache_window()
    assert not torch.equal(before, s.cache.k)
    s._recache = False
    assert s.next().frames.shape[0] == 12


def test_word_positions_follow_the_tokenizer():
    from instrument.engine.text import PromptEncoder
    from transformers import UMT5Config, UMT5EncoderModel

    from instrument.engine.default import TEXT_ENCODER

    tok = build_tokenizer()
    te = UMT5EncoderModel(UMT5Config(vocab_size=len(tok), **TEXT_ENCODER)).eval()
    enc = PromptEncoder(tok, te, 8, "cpu", torch.float32)
    p = enc.encode("A red fox and a RED circle")
    assert p.positions("red") == [1, 5]
    assert p.positions("fox") == [2]
    assert p.positions("circle") == [6]
    assert p.length == 8 and not p.truncated  # 7 words + </s> fill the 8 positions exactly
    q = enc.encode("one two three four five six seven eight nine")
    assert q.truncated and q.length == 8
    assert torch.all(q.embeddings[0, q.length:] == 0)
    short = enc.encode("red")
    assert short.length == 2 and torch.all(short.embeddings[0, 2:] == 0)
    assert enc.encode("red") is short  # cached


@pytest.mark.parametrize("sampler", ["renoise", "ddim"])
def test_first_chunk_is_the_samplers_loop_over_diffusers_forward(sampler):
    """renoise draws fresh noise around each x0 (Self-Forcing); ddim keeps the noise the model implies."""
    m = tiny_transformer(6)
    engine, kw = tiny_engine(m)
    s = engine.stream("a red circle", seed=3, shift=3.0, sampler=sampler, **kw)
    got = s.next().latents
    g = torch.Generator().manual_seed(3)
    x = torch.randn(s.latent_shape, generator=g)
    sigmas = [warp(t, 3.0) for t in (1000.0, 750.0, 500.0, 250.0)]
    for i, sigma in enumerate(sigmas):
        v = m(x, torch.tensor([sigma * 1000.0]), s.prompt.embeddings, return_dict=False)[0]
        x0 = x - sigma * v
        if i + 1 < len(sigmas):
            noise = torch.randn(s.latent_shape, generator=g) if sampler == "renoise" else x0 + v
            x = (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * noise
    torch.testing.assert_close(got, x0, rtol=1e-4, atol=1e-4)
    with pytest.raises(Exception, match="sampler"):
        engine.stream("a red circle", sampler="euler-ancestral", **kw)
