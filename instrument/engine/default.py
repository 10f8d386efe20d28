"""The embedded default: a small Wan of the same architecture that runs on any laptop CPU.

When the package holds the trained sketch model (instrument/sketch/model/, written by
`python -m instrument.sketch.train` and copied there), that is the default. Otherwise nothing is
downloaded: the transformer, the VAE and a small umT5 encoder are built from small configs with seeded
weights, and the tokenizer is a word-level one built here from a fixed vocabulary; that model moves but
follows no prompt. `save_folder` writes the seeded components as a diffusers-format Wan folder, which is
how the tests exercise the real `--model DIR` loading path.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TRAINED = Path(__file__).resolve().parent.parent / "sketch" / "model"
TEXT_LEN = 64
SIZE = (128, 128)  # width, height

TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=24, in_channels=16, out_channels=16,
    text_dim=64, freq_dim=64, ffn_dim=256, num_layers=4, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)
VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])
TEXT_ENCODER = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, relative_attention_num_buckets=16,
                    relative_attention_max_distance=32, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)

WORDS = """
a an the and or of with on in at over under behind beside near far left right up down top bottom center
red orange yellow green blue purple pink white black grey gray brown gold silver cyan magenta violet
circle circles square squares triangle triangles star stars ring rings dot dots line lines cross crosses
heart hearts shape shapes ball balls box boxes
one two three four five many several single pair
small big large tiny huge little giant
moving moves move bouncing bounces bounce rotating rotates rotate spinning spins spin growing grows grow
shrinking shrinks shrink falling falls fall rising rises rise drifting drifts drift sliding slides
slowly quickly fast slow still
background backdrop plain striped stripes checkered checkerboard dotted gradient noise noisy textured
sky sea water grass field forest city street room night day sun moon cloud clouds fire smoke light dark
glowing bright dim soft sharp blurry
fox cat dog bird fish horse person people face hand tree trees flower flowers mountain mountains river
""".split()


def trained_folder() -> Path | None:
    """The trained sketch model shipped in the package, if this install has it."""
    return TRAINED if (TRAINED / "model_index.json").is_file() else None


def build_tokenizer():
    return word_tokenizer(WORDS, TEXT_LEN)


def word_tokenizer(words, text_len: int):
    """A word-level tokenizer built here (lower-cased, </s> appended), loadable by transformers."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=text_len)


def build_components(seed: int = 20261128):
    """(transformer, vae, text_encoder, tokenizer) with deterministic weights."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = build_tokenizer()
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(**TRANSFORMER)
        vae = AutoencoderKLWan(**VAE)
        text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **TEXT_ENCODER))
    finally:
        torch.random.set_rng_state(gen_state)
    for m in (transformer, vae, text_encoder):
        m.eval().requires_grad_(False)
    return transformer, vae, text_encoder, tokenizer


def save_folder(path: str | Path, seed: int = 20261128) -> Path:
    """Write the embedded model as a diffusers-format Wan text-to-video folder."""
    path = Path(path)
    transformer, vae, text_encoder, tokenizer = build_components(seed)
    transformer.save_pretrained(path / "transformer")
    vae.save_pretrained(path / "vae")
    text_encoder.save_pretrained(path / "text_encoder")
    tokenizer.save_pretrained(path / "tokenizer")
    (path / "scheduler").mkdir(parents=True, exist_ok=True)
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "UniPCMultistepScheduler", "num_train_timesteps": 1000, "flow_shift": 3.0,
        "prediction_type": "flow_prediction", "use_flow_sigmas": True}))
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "_diffusers_version": "0.42.1",
        "transformer": ["diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"],
        "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
        "scheduler": ["diffusers", "UniPCMultistepScheduler"]}, indent=1))
    return path
