"""Loading real Wan weights: a diffusers-format folder, and a causal generator checkpoint on top of it; or the
real Wan configurations with random weights (`random:1.3b`), for measuring speed before the weights are at hand.

Only safetensors or `torch.load(weights_only=True)`: a checkpoint is data, never code. Every way a path
can be wrong ends in one `UserError` that names the path and what was expected.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..progress import Progress
from . import default

FOLDER_PARTS = ("transformer", "text_encoder", "tokenizer")  # and vae/ (Wan) or codec/ (the sketch model)
CHECKPOINT_NESTS = ("generator_ema", "generator", "model", "state_dict")
WAN_TEXT_LEN = 512
RANDOM = "random:"  # --model random:1.3b: the real configuration with random weights (noise pictures, real speed)
WAN_CONFIGS = {  # the DiT's size; everything else is common to Wan 2.1 T2V
    "1.3b": dict(num_attention_heads=12, ffn_dim=8960, num_layers=30),
    "14b": dict(num_attention_heads=40, ffn_dim=13824, num_layers=40),
}


@dataclass
class Components:
    transformer: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    text_len: int
    source: str
    native_size: tuple[int, int] | None = None  # (width, height) the model was trained at, if it says
    sampling: dict | None = None  # {"shift", "sampler", "schedule"}: how the model was trained to be sampled
    object_scale: float = 1.0  # a sketch model's: its training clips' object sizes (data.sample)
    upright: bool = False  # and whether they start at angle 0
    random_weights: bool = False  # --model random:CONFIG: then --decoder tiny needs no file either


def load_components(model: str | None, checkpoint: str | None, device, dtype, progress=None) -> Components:
    progress = progress or Progress()
    trained = default.trained_folder() if model is None else None
    if trained is not None:
        progress("loading the embedded sketch model (trained, shipped in the package)")
        comps = _load_folder(trained, dtype, progress)
        comps.source = "embedded sketch model"
    elif model is not None and model.startswith(RANDOM):
        comps = random_components(model[len(RANDOM):], device, dtype, progress)
    elif model is None:
        progress("building the embedded default model (small Wan, seeded weights: it does not follow prompts)")
        transformer, vae, text_encoder, tokenizer = default.build_components()
        comps = Components(transformer, vae, text_encoder, tokenizer, default.TEXT_LEN, "embedded default",
                           default.SIZE)
    else:
        comps = _load_folder(Path(model), dtype, progress)
    if checkpoint is not None:
        apply_checkpoint(comps.transformer, Path(checkpoint), progress)
    progress(f"moving weights to {device}")
    cast_keeping_fp32(comps.transformer, dtype).to(device)
    comps.text_encoder.to(device=device, dtype=dtype)
    comps.vae.to(device=device)
    for m in (comps.transformer, comps.vae, comps.text_encoder):
        m.eval().requires_grad_(False)
    return comps


def random_components(config: str, device, dtype, progress) -> Components:
    """A Wan 2.1 T2V model of a real configuration (WAN_CONFIGS) with random weights, built directly on the
    device: its speed is the real model's (speed does not depend on weight values), its pictures are noise."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    if config not in WAN_CONFIGS:
        raise UserError(f"--model {RANDOM}{config}: expected "
                        + " or ".join(f"{RANDOM}{c}" for c in WAN_CONFIGS) + " (random weights of that configuration)")
    progress(f"building Wan2.1 {config} with random weights on {device}")
    with torch.device(device):
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
            freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, **WAN_CONFIGS[config])
        vae = AutoencoderKLWan()  # the Wan 2.1 VAE configuration
        tok = default.build_tokenizer()
        # The text encoder runs once per prompt, off the hot path: a one-layer stand-in of umT5's width.
        text = UMT5EncoderModel(UMT5Config(vocab_size=len(tok), d_model=4096, d_kv=64, d_ff=256, num_layers=1,
                                           num_heads=4, feed_forward_proj="gated-gelu", dropout_rate=0.0))
    cast_keeping_fp32(transformer, dtype)
    text.to(dtype)
    return Components(transformer, vae, text, tok, WAN_TEXT_LEN, f"random Wan2.1 {config}", random_weights=True)


def cast_keeping_fp32(model, dtype):
    """Cast to dtype but keep the modules diffusers keeps in float32 (norms, time embedding, modulation)."""
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, param in model.named_parameters():
        target = torch.float32 if any(k in name.split(".") for k in keep) else dtype
        if param.dtype != target:
            param.data = param.data.to(target)
    return model


def _load_folder(root: Path, dtype, progress) -> Components:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    if not root.is_dir():
        raise UserError(f"--model {root}: no such folder (expected a diffusers-format Wan 2.1 text-to-video "
                        "folder, e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers)")
    missing = [p for p in ("model_index.json", *FOLDER_PARTS) if not (root / p).exists()]
    if not (root / "vae").exists() and not (root / "codec").exists():
        missing.append("vae")
    if missing:
        raise UserError(f"--model {root}: not a diffusers Wan folder, missing {', '.join(missing)} "
                        f"(expected model_index.json and {', '.join(p + '/' for p in FOLDER_PARTS)}, vae/)")
    cfg_path = root / "transformer" / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--model {root}: cannot read {cfg_path}: {e}") from None
    if cfg.get("_class_name") != "WanTransformer3DModel":
        raise UserError(f"--model {root}: transformer is {cfg.get('_class_name')!r}, expected WanTransformer3DModel")
    size = (f"{cfg.get('num_layers')} layers, {cfg.get('num_attention_heads')} heads x "
            f"{cfg.get('attention_head_dim')}, ffn {cfg.get('ffn_dim')}")
    try:
        progress(f"loading transformer from {root / 'transformer'} ({size})")
        transformer = WanTransformer3DModel.from_pretrained(root, subfolder="transformer", torch_dtype=dtype)
        if (root / "vae").exists():
            progress("loading VAE")
            vae = AutoencoderKLWan.from_pretrained(root, subfolder="vae", torch_dtype=torch.float32)
        else:  # the project's sketch model: its own small causal codec in place of the Wan VAE
            from ..sketch.codec import Codec

            progress("loading codec")
            vae = Codec.load(root / "codec")
        progress("loading text encoder (umT5)")
        text_encoder = UMT5EncoderModel.from_pretrained(root, subfolder="text_encoder", torch_dtype=dtype)
        progress("loading tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(root, subfolder="tokenizer")
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--model {root}: could not load: {first}") from None
    text_len = min(WAN_TEXT_LEN, int(getattr(tokenizer, "model_max_length", WAN_TEXT_LEN) or WAN_TEXT_LEN))
    size, sampling, object_scale, upright = None, None, 1.0, False
    try:
        sketch = json.loads((root / "model_index.json").read_text()).get("sketch") or {}
        if "size" in sketch:
            size = (int(sketch["size"][0]), int(sketch["size"][1]))
        sampling = {k: sketch[k] for k in ("shift", "sampler", "schedule") if k in sketch} or None
        object_scale = float(sketch.get("object_scale", 1.0))
        upright = bool(sketch.get("upright", False))
    except (OSError, ValueError, TypeError, IndexError, AttributeError):
        pass
    return Components(transformer, vae, text_encoder, tokenizer, text_len, str(root), size, sampling, object_scale,
                      upright)


def read_state_dict(path: Path) -> dict:
    """Tensors from a .safetensors or a .pt/.pth file, never executing code from it."""
    if not path.is_file():
        raise UserError(f"--checkpoint {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # any unreadable file: one line, no traceback
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"--checkpoint {path}: not a readable checkpoint (.safetensors, or .pt saved with "
                        f"torch.save of tensors): {first}") from None
    if not isinstance(obj, dict):
        raise UserError(f"--checkpoint {path}: holds a {type(obj).__name__}, expected a dict of tensors")
    return obj


def unnest(obj: dict, path: Path) -> dict:
    """The generator's weights: under generator_ema, generator or model, or at the top level."""
    for key in CHECKPOINT_NESTS:
        inner = obj.get(key)
        if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserError(f"--checkpoint {path}: no weights found (expected tensors at the top level or under "
                        f"one of {', '.join(CHECKPOINT_NESTS)}; found keys {', '.join(list(obj)[:6])})")
    return tensors


def to_diffusers_keys(state: dict) -> dict:
    """Original Wan names (with Self-Forcing's 'model.' prefix) to diffusers names, via diffusers' converter."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    stripped = {}
    for k, v in state.items():
        for prefix in ("model.diffusion_model.", "_orig_mod.", "model."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        stripped[k] = v
    if any(k.startswith("blocks.") and ".attn1." in k for k in stripped):
        return stripped  # already diffusers names
    return convert_wan_transformer_to_diffusers(stripped)


def apply_checkpoint(transformer, path: Path, progress) -> None:
    progress(f"reading checkpoint {path}")
    state = to_diffusers_keys(unnest(read_state_dict(path), path))
    expected = transformer.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise UserError(f"--checkpoint {path}: keys do not match the --model transformer: {'; '.join(parts)}. "
                        "Expected a Wan 2.1 causal generator (Self-Forcing, CausVid, LongLive) of the same size")
    wrong = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        k = wrong[0]
        raise UserError(f"--checkpoint {path}: {len(wrong)} tensors have the wrong shape (e.g. {k}: "
                        f"{tuple(state[k].shape)} vs {tuple(expected[k].shape)}): a different model size?")
    progress(f"applying {len(state)} tensors from the checkpoint")
    transformer.load_state_dict(state, strict=True)
