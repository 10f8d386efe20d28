"""FP8 linear layers for the DiT's blocks: Hopper's e4m3 tensor cores run a matmul at twice bf16's rate.

A choice made when the engine is built (`--fp8`), never a knob: it swaps modules, so it would recompile.

Weights are quantized once, with one scale per output channel (its largest magnitude maps to e4m3's
largest finite value, 448); activations are quantized on the fly with one scale per token, so one loud
token (the attention sink, a bent neuron) cannot flush every other token's values to zero. The matmul
(`torch._scaled_mm`) multiplies the two e4m3 operands, accumulates in float32 and applies both scales,
which is the float64 computation of `reference()` up to float32 accumulation.

Which linears: the self-attention projections, the cross-attention query and output projections and
the FFN's first layer of every block, about two thirds of a pass's matmul work. Left in bf16: the FFN's
second layer, because its input (the 8,960 GELU outputs of every token) costs more to quantize per token
than FP8 saves on the product (BENCHMARKS.md round 7: 26.5 ms a chunk for that quantization against
about 9 ms of matmul saved); the cross-attention keys and values (computed once per prompt), the patch
embedding, the time and text embedders and the output head (small, and the output head writes the
velocity directly).

Bends are unaffected: every bend site acts on activations between these layers (the FFN's neurons after
its GELU, the heads before the output projection), and an activation is quantized only as the next
linear layer reads it.
"""

from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
TINY = 1e-12  # keeps an all-zero row's scale finite (its values quantize to zero either way)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values, float32 scale [rows, 1]) of a 2-D tensor, one scale per row: x ~ values * scale."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=TINY) / E4M3_MAX
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


class FP8Linear(torch.nn.Module):
    """A `torch.nn.Linear` whose weight is held in e4m3 with per-output-channel scales."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if self.in_features % 16 or self.out_features % 16:
            raise ValueError(f"FP8 matmuls need dimensions divisible by 16, not {self.out_features}x{self.in_features}")
        w, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight_fp8", w)  # [out, in]; .t() is the column-major operand _scaled_mm wants
        self.register_buffer("weight_scale", scale.t().contiguous())  # [1, out]
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        xq, x_scale = quantize_rows(rows)
        # cuBLAS's row-wise scaled product writes bf16 only; the CPU's also writes float32 (the tests' dtype)
        exact = x.dtype == torch.float32 and not x.is_cuda
        out = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.weight_scale,
                               out_dtype=torch.float32 if exact else torch.bfloat16)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same quantized product computed in float64 (for tests)."""
        rows = x.reshape(-1, self.in_features)
        xq, x_scale = quantize_rows(rows)
        out = (xq.double() * x_scale.double()) @ (self.weight_fp8.double() * self.weight_scale.double().t()).t()
        if self.bias is not None:
            out = out + self.bias.double()
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 per-channel"


def block_linears(block) -> dict[str, torch.nn.Module]:
    """The linears of one diffusers WanTransformerBlock that run at every pass, by attribute path."""
    return {
        "attn1.to_q": block.attn1.to_q, "attn1.to_k": block.attn1.to_k, "attn1.to_v": block.attn1.to_v,
        "attn1.to_out.0": block.attn1.to_out[0],
        "attn2.to_q": block.attn2.to_q, "attn2.to_out.0": block.attn2.to_out[0],
        "ffn.net.0.proj": block.ffn.net[0].proj,
    }


def _set(module, path: str, new) -> None:
    *parents, last = path.split(".")
    for p in parents:
        module = module[int(p)] if p.isdigit() else getattr(module, p)
    if last.isdigit():
        module[int(last)] = new
    else:
        setattr(module, last, new)


def supported(device) -> tuple[bool, str]:
    """Whether this device runs e4m3 matmuls: CUDA compute capability 8.9+ (Ada, Hopper) or the CPU."""
    device = torch.device(device)
    if device.type == "cpu":
        return True, "the CPU (emulated: correct, not fast)"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) >= (8, 9):
            return True, f"compute capability {major}.{minor}"
        return False, f"compute capability {major}.{minor}; FP8 matmuls need 8.9 (Ada) or 9.0 (Hopper)"
    return False, f"{device.type} has no FP8 matmul"


@torch.no_grad()
def quantize_blocks(transformer) -> int:
    """Swap every block's per-pass linears for FP8Linear, in place; returns how many were swapped."""
    count = 0
    for block in transformer.blocks:
        for path, linear in block_linears(block).items():
            if isinstance(linear, torch.nn.Linear):
                _set(block, path, FP8Linear(linear))
                count += 1
    return count
