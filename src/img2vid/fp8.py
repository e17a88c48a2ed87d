"""Opt-in, APPROXIMATE fast mode: float8 (e4m3) matrix products for the UNet's transformer linear layers.

Why: Hopper (sm_90) tensor cores multiply float8 matrices about twice as fast as float16 ones, and the linear layers
of the transformers are about a quarter of an SVD UNet step on an H100. So the gain is bounded by roughly an eighth
of a step, less whatever quantization work the compiler cannot fuse into the ops before it. Measured (H100, torch
2.11, BENCHMARKS.md run 12) that work wins: compiled, 0.482 s per step against 0.433 s in float16, 1.2 s eager
(each layer quantizes its own input, so q/k/v quantize the same tokens three times; every product is written in
bfloat16 and cast back); with the current code eager takes 1.07 s a step against 0.367 s (run 106), a float8 GEGLU
projection also leaving img2vid's fused GEGLU kernel. EXPERIMENTAL until that is fixed; the CLI does not offer
it. It is meant for `torch.compile`: compiled, the per-token scale and the cast to float8 are pointwise ops and a
row reduction that inductor can fuse into the kernel producing the activations (a LayerNorm, mostly); in eager mode
they are separate passes over float32 temporaries.

What is approximate: e4m3 keeps 3 mantissa bits, so every input and weight value moves by up to 1/16 of its size
when rounded, on a scale chosen per token (activations) and per output row (weights). Expect about 2-4% relative error
per linear layer and more through the whole UNet (5-6% on the tests' tiny UNet): a seed no longer gives exactly the
float16 model's video. Nothing else changes: convolutions, norms, attention itself (softmax(QK^T)V) and the time
embeddings stay in the model's dtype. Nothing in the package turns this on by itself: `quantize_unet_fp8` must be
called.

The transform is for inference only. A quantized UNet's state dict holds the float8 weights and their scales as raw
integer bits under new names (`weight_bits`, `scale_bits`); it is not a checkpoint format and should not be saved.

torch._scaled_mm facts this relies on (read in PyTorch's aten/src/ATen/native/cuda/ScaledBlas.cpp, formerly
Blas.cpp, `_scaled_mm_out_cuda`): mat_a must be row-major and mat_b column-major, K and N multiples of 16; scales
of shape (M, 1) and (1, N), float32, contiguous, select row-wise scaling. On sm_90 with cuBLAS 12.9 or later (any
CUDA 13 build) row-wise scaling runs in cuBLASLt, whose outer-vector scaling writes float16, bfloat16 or float32.
Otherwise (sm_89, sm_100+, CUDA 12.8 builds) it runs a CUTLASS kernel that took only bfloat16 output before PyTorch
PR #166744. So the product is always asked for in bfloat16 and cast to the input's dtype: valid on every path, and
the cast fuses into the bias add when compiled.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from img2vid.unet_blocks import TimeEmbedding
from img2vid.unet_transformer import SpatioTemporalTransformer

E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
# Smallest row maximum that gets a scale of its own: an all-zero row (padding, dead weights) would otherwise divide
# by a zero scale. Rows this small are still quantized, just not to the full float8 range.
AMAX_FLOOR = 1e-12
FP8_MIN_CAPABILITY = (8, 9)  # Ada and Hopper and later have float8 tensor cores


def quantize_rows(t: Tensor) -> tuple[Tensor, Tensor]:
    """Row-wise float8 quantization: t (R, K) -> (values (R, K) float8_e4m3fn, scales (R, 1) float32), so that
    t ~= values * scales, each row scaled so that its largest magnitude maps to E4M3_MAX.

    Pure tensor ops (no host syncs, no branches on values): compiled, it fuses into whatever produced t. The clamp
    keeps division rounding from leaving the e4m3 range: a cast from beyond it is not guaranteed to saturate (e4m3fn
    has no infinity; its one spare code is NaN)."""
    amax = t.abs().amax(dim=-1, keepdim=True).float()  # abs and max are exact in t's dtype
    scale = amax.clamp(min=AMAX_FLOOR) / E4M3_MAX
    values = (t.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return values, scale


def has_fp8_matmul(device: torch.device) -> bool:
    """Whether torch._scaled_mm can run on `device`. Static under torch.compile: the device is guarded, and
    dynamo folds torch.cuda.get_device_properties to a constant."""
    if device.type != "cuda":
        return False
    props = torch.cuda.get_device_properties(device)
    return (props.major, props.minor) >= FP8_MIN_CAPABILITY


class Fp8Linear(nn.Module):
    """nn.Linear with its weight in float8 e4m3 (one float32 scale per output row) and activations quantized per
    token on the fly; the product runs on float8 tensor cores (sm_89+) and anywhere else as a float32 product of the
    same quantized values, so CPU results show exactly the quantization's error. Output and bias in x's dtype.

    The quantized weight and its scales are stored as raw bits in integer buffers: `Module.to(dtype)`, `.half()`
    and friends cast every floating buffer, which would turn the float8 weight into float16 and round the scales.
    Integer buffers still move with `.to(device)`."""

    def __init__(self, weight: Tensor, bias: nn.Parameter | None) -> None:
        """weight: (out_features, in_features), both multiples of 16 (float8 matrix products need it)."""
        super().__init__()
        out_features, in_features = weight.shape
        if in_features % 16 or out_features % 16:
            raise ValueError(f"float8 linear layers need features in multiples of 16, got {tuple(weight.shape)}")
        self.in_features = in_features
        self.out_features = out_features
        values, scale = quantize_rows(weight.detach())
        # (N, K) row-major, so weight_fp8.t() is the column-major (K, N) mat_b that _scaled_mm wants, with no copy.
        self.register_buffer("weight_bits", values.view(torch.uint8))
        self.register_buffer("scale_bits", scale.reshape(1, out_features).view(torch.int32))  # (N, 1) -> (1, N)
        self.bias = bias

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        """Quantize `linear` where its weight is (CPU or GPU); the bias Parameter is shared, not copied."""
        return cls(linear.weight, linear.bias)

    @property
    def weight_fp8(self) -> Tensor:
        return self.weight_bits.view(torch.float8_e4m3fn)  # (N, K)

    @property
    def weight_scale(self) -> Tensor:
        return self.scale_bits.view(torch.float32)  # (1, N)

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., in_features) -> (..., out_features) in x's dtype."""
        lead = x.shape[:-1]
        values, scale = quantize_rows(x.reshape(-1, self.in_features))  # (..., K) -> (M, K), scale (M, 1)
        # Tokens permuted out of a (1, C, H*W) map reshape to a column-major (M, K) view, and the quantizing ops keep
        # their input's strides, but mat_a must be row-major. Compiled, the quantize kernel just writes this layout.
        values = values.contiguous()
        if has_fp8_matmul(x.device):
            out = torch._scaled_mm(
                values,
                self.weight_fp8.t(),
                scale_a=scale,
                scale_b=self.weight_scale,
                out_dtype=torch.bfloat16,  # accepted by every row-wise path (see the module docstring)
                use_fast_accum=True,
            )
        else:
            # Same quantized values, scales applied after the sum as _scaled_mm does; float32 stands in for the
            # tensor cores' accumulator.
            out = (values.float() @ self.weight_fp8.float().t()) * (scale * self.weight_scale)  # (M, N)
        out = out.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.reshape(*lead, self.out_features)  # (M, N) -> (..., N)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _fp8_candidates(unet: nn.Module, min_features: int) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute name, layer) for every linear layer of the transformers worth quantizing."""
    found = []
    for transformer in unet.modules():
        if not isinstance(transformer, SpatioTemporalTransformer):
            continue
        for path, parent in transformer.named_modules():
            # The frame-position MLP sees F rows once per forward: nothing to gain, and it is a time embedding.
            # Cross-attention (attn2) to SVD's single CLIP token projects one row per video (Attention's shortcut):
            # quantizing it would only add error.
            if isinstance(parent, TimeEmbedding) or "attn2" in path.split("."):
                continue
            for name, child in parent.named_children():
                if (
                    isinstance(child, nn.Linear)
                    and child.in_features % 16 == 0
                    and child.out_features % 16 == 0
                    and min(child.in_features, child.out_features) >= min_features
                ):
                    found.append((parent, name, child))
    return found


def quantize_unet_fp8(unet: nn.Module, min_features: int = 256) -> int:
    """Replace, in place, the linear layers inside the UNet's spatio-temporal transformers (self-attention q/k/v/out,
    GEGLU and feed-forward projections, proj_in/proj_out) by Fp8Linear; returns how many were replaced.

    APPROXIMATE (see the module docstring) and inference only. Layers whose features are not multiples of 16 (a
    float8 GEMM requirement) or smaller than `min_features` (too small to gain; SVD's smallest are 320 wide) stay
    as they are, as do convolutions, norms, time embeddings and everything outside the transformers. Weights are
    quantized where they are, on their device and from their dtype, so call it on the UNet in its final dtype (later
    dtype casts reach only the biases; outputs follow the input's dtype). Calling it again replaces nothing. Module
    names are unchanged, but the replaced layers' state-dict entries are not loadable into an unquantized UNet: do
    not save a quantized UNet."""
    found = _fp8_candidates(unet, min_features)
    with torch.no_grad():
        for parent, name, linear in found:
            # setattr also works for ModuleList children ("to_out", "net"): their names are "0", "2".
            setattr(parent, name, Fp8Linear.from_linear(linear))
    return len(found)
