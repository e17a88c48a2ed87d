"""The approximate float8 mode: quantization maths, Fp8Linear against nn.Linear, the UNet transform, compilation."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from torch import nn

from img2vid.configs import preset
from img2vid.fp8 import AMAX_FLOOR, E4M3_MAX, Fp8Linear, has_fp8_matmul, quantize_rows, quantize_unet_fp8
from img2vid.unet import UNet
from img2vid.unet_blocks import TimeEmbedding
from img2vid.unet_transformer import SpatioTemporalTransformer

HAS_COMPILER = shutil.which("g++") is not None or shutil.which("c++") is not None


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _linear(k: int, n: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    if bias:
        with torch.no_grad():
            lin.bias.normal_()  # default init makes the bias small enough to hide a missing or doubled bias
    return lin


# ---------------------------------------------------------------------------------------------------------------------
# Quantization maths


def test_row_scales_map_each_row_max_to_e4m3_max() -> None:
    assert E4M3_MAX == torch.finfo(torch.float8_e4m3fn).max
    g = torch.Generator().manual_seed(0)
    magnitudes = torch.tensor([1e-4, 1e-2, 1.0, 3e2, 6e4])[:, None]
    t = torch.randn(5, 64, generator=g) * magnitudes
    values, scale = quantize_rows(t)
    assert values.dtype == torch.float8_e4m3fn and values.shape == (5, 64)
    assert scale.dtype == torch.float32 and scale.shape == (5, 1)
    torch.testing.assert_close(scale, t.abs().amax(dim=1, keepdim=True) / E4M3_MAX, rtol=0, atol=0)
    assert torch.equal(values.float().abs().amax(dim=1), torch.full((5,), E4M3_MAX))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_values_round_trip_within_e4m3_precision(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    t = (torch.randn(8, 128, generator=g) * torch.logspace(-3, 3, 8)[:, None]).to(dtype)
    values, scale = quantize_rows(t)
    back = values.float() * scale
    exact = t.float()
    # e4m3 normals: 3 mantissa bits, so rounding moves a value by at most 2^-4 of itself; below the smallest normal
    # (2^-6 of the scale) values sit on a fixed grid of step 2^-9, so by at most 2^-10 of the scale.
    bound = torch.maximum(exact.abs() * 2**-4, scale * 2**-10) * (1 + 1e-6)
    assert ((back - exact).abs() <= bound).all()
    # Really quantized: most values moved.
    assert (back != exact).float().mean() > 0.5


def test_zero_rows_are_safe() -> None:
    t = torch.randn(3, 32)
    t[1] = 0
    values, scale = quantize_rows(t)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert scale[1].item() == pytest.approx(AMAX_FLOOR / E4M3_MAX)
    assert torch.equal(values[1].float(), torch.zeros(32))
    assert not values.float().isnan().any()


def test_values_stay_inside_the_e4m3_range() -> None:
    # Extreme rows, including float16's largest finite value and rows under the amax floor: no NaN (the e4m3fn cast
    # of an out-of-range value) and nothing beyond +-448.
    t = torch.tensor(
        [
            [65504.0, -65504.0, 1.0, 0.0],
            [3e-38, -1e-30, 1e-20, 0.0],  # under AMAX_FLOOR: the floored scale leaves them near zero
            [1e30, -1e30, 1e29, -7e29],
            [0.1, -0.2, 0.3, -0.4],
        ]
    )
    values, scale = quantize_rows(t)
    f = values.float()
    assert not f.isnan().any()
    assert f.abs().max().item() <= E4M3_MAX
    assert torch.equal(f[0, :2], torch.tensor([E4M3_MAX, -E4M3_MAX]))
    assert torch.equal(f[2, :2], torch.tensor([E4M3_MAX, -E4M3_MAX]))


# ---------------------------------------------------------------------------------------------------------------------
# Fp8Linear


def test_fp8_linear_is_close_to_the_float32_linear_but_quantized() -> None:
    lin = _linear(320, 640)
    fp8 = Fp8Linear.from_linear(lin)
    x = torch.randn(4, 77, 320, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = lin(x)
        got = fp8(x)
    assert got.shape == (4, 77, 640) and got.dtype == torch.float32
    # Bias excluded: it is exact and would hide the matrix product's error.
    err = _rel(got - lin.bias, expected - lin.bias)
    assert 0.005 < err < 0.08, err


def test_reference_product_is_the_dequantized_product() -> None:
    lin = _linear(64, 48, seed=3)
    fp8 = Fp8Linear.from_linear(lin)
    x = torch.randn(10, 64, generator=torch.Generator().manual_seed(3))
    xq, xs = quantize_rows(x)
    wq, ws = quantize_rows(lin.weight.detach())
    expected = (xq.float() * xs) @ (wq.float() * ws).t() + lin.bias.detach()
    with torch.no_grad():
        torch.testing.assert_close(fp8(x), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(fp8.weight_fp8, wq)
    assert torch.equal(fp8.weight_scale, ws.reshape(1, -1))


def test_leading_dims_are_per_token() -> None:
    fp8 = Fp8Linear.from_linear(_linear(32, 16, seed=4))
    x = torch.randn(2, 3, 5, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        whole = fp8(x)
        rows = fp8(x.reshape(-1, 32))
        one = fp8(x[1, 2])
    assert whole.shape == (2, 3, 5, 16)
    assert torch.equal(whole.reshape(-1, 16), rows)
    torch.testing.assert_close(whole[1, 2], one)  # per-token scales: a token's result ignores the other tokens
    # A transposed token view (what a (1, C, H*W) -> (1, H*W, C) permute gives) is read correctly.
    xt = torch.randn(1, 32, 12).transpose(1, 2)  # (1, 12, 32), column-major rows
    with torch.no_grad():
        torch.testing.assert_close(fp8(xt), fp8(xt.contiguous()), rtol=0, atol=0)


def test_bias_is_added_once_and_optional() -> None:
    with_bias = Fp8Linear.from_linear(_linear(32, 48, seed=5))
    without = Fp8Linear.from_linear(_linear(32, 48, bias=False, seed=5))
    assert without.bias is None
    x = torch.randn(7, 32)
    with torch.no_grad():
        assert torch.equal(with_bias(torch.zeros(3, 32)), with_bias.bias.detach().expand(3, 48))
        assert torch.equal(without(torch.zeros(3, 32)), torch.zeros(3, 48))
        torch.testing.assert_close(with_bias(x) - with_bias.bias, without(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_give_half_outputs(dtype: torch.dtype) -> None:
    lin = _linear(64, 32, seed=6).to(dtype)
    fp8 = Fp8Linear.from_linear(lin)
    x = torch.randn(5, 64).to(dtype)
    with torch.no_grad():
        got = fp8(x)
        expected = lin.float()(x.float())
    assert got.dtype == dtype
    assert _rel(got, expected) < 0.08


def test_dtype_casts_leave_the_quantized_weight_alone() -> None:
    fp8 = Fp8Linear.from_linear(_linear(32, 16, seed=7))
    bits, scales = fp8.weight_bits.clone(), fp8.scale_bits.clone()
    x = torch.randn(4, 32).half()
    with torch.no_grad():
        before = fp8(x.float())
        fp8.half()
        assert torch.equal(fp8.weight_bits, bits) and torch.equal(fp8.scale_bits, scales)
        assert fp8.bias.dtype == torch.float16  # the bias follows the model's dtype
        # Same quantized values: only the float16 rounding of the bias and the output differ.
        torch.testing.assert_close(fp8(x).float(), before, rtol=2e-3, atol=2e-3)


def test_features_must_be_multiples_of_16() -> None:
    with pytest.raises(ValueError, match="multiples of 16"):
        Fp8Linear.from_linear(nn.Linear(24, 32))
    with pytest.raises(ValueError, match="multiples of 16"):
        Fp8Linear.from_linear(nn.Linear(32, 40))


def test_cpu_has_no_fp8_matmul() -> None:
    assert not has_fp8_matmul(torch.device("cpu"))


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler for inductor")
def test_compiles_fullgraph_on_cpu() -> None:
    torch._dynamo.reset()
    fp8 = Fp8Linear.from_linear(_linear(64, 32, seed=8)).half()
    x = torch.randn(2, 9, 64).half()
    compiled = torch.compile(fp8, fullgraph=True, dynamic=False)
    with torch.no_grad():
        expected = fp8(x)
        got = compiled(x)
    assert got.dtype == torch.float16 and got.shape == (2, 9, 32)
    assert _rel(got, expected) < 2e-3


# ---------------------------------------------------------------------------------------------------------------------
# The UNet transform


def _tiny_unet(seed: int) -> UNet:
    torch.manual_seed(seed)
    unet = UNet(preset("tiny").unet).eval()
    with torch.no_grad():
        for name, p in unet.named_parameters():  # no zero or constant init hiding a layer
            p.add_(torch.randn_like(p) * (1.0 if name.endswith("mix_factor") else 0.05))
    return unet


def _unet_inputs(seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 3, 8, 8, 8, generator=g)  # (B, F, C, h, w)
    timestep = torch.tensor([0.7, -1.1])
    context = torch.randn(2, 1, 32, generator=g)
    ids = torch.tensor([[6.0, 127.0, 0.02], [3.0, 40.0, 0.3]])
    return sample, timestep, context, ids


def test_quantize_unet_replaces_the_transformer_linears() -> None:
    unet = _tiny_unet(0)
    # Tiny UNet: 2 + 1 + 3 spatio-temporal transformers of depth 1, each with 16 linear layers to quantize (proj_in,
    # proj_out; spatial block: 4 self-attention, GEGLU, net.2; temporal block: the same plus ff_in's two). The
    # cross-attentions (4 layers per block) stay: they project SVD's single context token, one row per video.
    assert quantize_unet_fp8(unet, min_features=16) == 96
    assert quantize_unet_fp8(unet, min_features=16) == 0  # nothing left to replace
    for name, m in unet.named_modules():
        if isinstance(m, Fp8Linear):
            assert ".attentions." in name and ".time_pos_embed." not in name and ".attn2." not in name
        if isinstance(m, nn.Linear):  # what is left: time embeddings, resnet time projections, cross-attention
            assert any(key in name for key in ("time_pos_embed", "time_emb", "add_embedding", ".attn2."))


def test_quantize_unet_skips_small_layers() -> None:
    # Default min_features leaves the tiny UNet (32 and 64 channels) alone. At 64 only the mid block's 64-channel
    # transformer qualifies, without its cross-attentions: 2 + (4 + 2) + (2 + 4 + 2) = 16.
    assert quantize_unet_fp8(_tiny_unet(0)) == 0
    assert quantize_unet_fp8(_tiny_unet(0), min_features=64) == 16


def test_quantize_transformer_skips_cross_attention_and_time_embedding() -> None:
    transformer = SpatioTemporalTransformer(48, heads=2, context_dim=40, depth=1, groups=8)
    # Cross-attention is never quantized; the time embedding is never touched.
    assert quantize_unet_fp8(transformer, min_features=16) == 16
    assert isinstance(transformer.transformer_blocks[0].attn2.to_k, nn.Linear)
    assert isinstance(transformer.time_pos_embed, TimeEmbedding)
    assert isinstance(transformer.time_pos_embed.linear_1, nn.Linear)


def test_quantized_unet_stays_close() -> None:
    unet = _tiny_unet(1)
    inputs = _unet_inputs(1)
    with torch.no_grad():
        expected = unet(*inputs).sample
        quantize_unet_fp8(unet, min_features=16)
        got = unet(*inputs).sample
    assert got.shape == expected.shape
    assert torch.isfinite(got).all()
    # Measured 5-6% over seeds 0-3 (each of its 96 layers adds its ~3.5%, partly averaging out); 10% is the bound.
    err = _rel(got, expected)
    assert 0.01 < err < 0.1, err


@pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)),
    reason="float8 matrix products need a CUDA GPU of capability 8.9 or more",
)
def test_scaled_mm_matches_the_reference_path() -> None:
    lin = _linear(320, 1280, seed=9).half()
    x = torch.randn(2, 300, 320, generator=torch.Generator().manual_seed(9)).half()
    with torch.no_grad():
        reference = Fp8Linear.from_linear(lin)(x)  # the float32 product of the same quantized values, on the CPU
        # Moved after the reference: .cuda() moves the bias Parameter that the layer shares with `lin`.
        fp8 = Fp8Linear.from_linear(lin).cuda()
        got = fp8(x.cuda())
        compiled = torch.compile(fp8, fullgraph=True)(x.cuda())
    assert got.dtype == torch.float16
    assert _rel(got.cpu(), reference) < 1e-2
    assert _rel(compiled.cpu(), reference) < 1e-2


def test_pipeline_fp8_mode(tiny_model_dir) -> None:
    """Pipeline.enable_fp8 quantizes the UNet in place (nothing at the tiny model's widths with the default
    threshold), refuses weight streaming either way round, and a quantized pipeline gives a video near the exact
    one (the tiny UNet quantized at min_features=16, every transformer linear but the cross-attentions)."""
    from img2vid import Pipeline
    from img2vid.errors import InputError

    pipe = Pipeline.from_pretrained(tiny_model_dir)
    assert pipe.enable_fp8() == 0
    streamed = Pipeline.from_pretrained(tiny_model_dir)
    streamed.enable_sequential_cpu_offload(device="cpu")
    with pytest.raises(InputError, match="fp8 mode cannot stream weights"):
        streamed.enable_fp8()

    image = torch.rand(3, 32, 48, generator=torch.Generator().manual_seed(0))
    kw = dict(height=32, width=48, num_frames=3, num_inference_steps=2, output_type="np")
    exact = pipe(image, generator=torch.manual_seed(1), **kw).frames
    assert quantize_unet_fp8(pipe.unet, min_features=16) > 0
    # Refused whichever way the UNet was quantized (here directly, not through enable_fp8).
    with pytest.raises(InputError, match="fp8 mode cannot stream weights"):
        pipe.enable_sequential_cpu_offload(device="cpu")
    approx = pipe(image, generator=torch.manual_seed(1), **kw).frames
    assert np.isfinite(approx).all()
    diff = float(np.abs(approx - exact).mean())
    assert 0 < diff < 0.05, diff  # changed, but by little (pixel values are in [0, 1])
