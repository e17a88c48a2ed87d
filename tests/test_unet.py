"""Parity of our spatio-temporal UNet with diffusers' UNetSpatioTemporalConditionModel (the oracle)."""

from __future__ import annotations

import shutil
from typing import Any

import pytest
import torch

from img2vid.configs import preset, unet_from_diffusers, unet_to_diffusers
from img2vid.unet import UNet

diffusers = pytest.importorskip("diffusers")
RefUNet = diffusers.UNetSpatioTemporalConditionModel

# Two blocks: the default block layout, one int per setting (diffusers broadcasts ints over blocks).
CONFIG_A: dict[str, Any] = dict(
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
    up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
    num_attention_heads=(2, 4),
    cross_attention_dim=32,
    layers_per_block=2,
    transformer_layers_per_block=1,
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=24,
    num_frames=5,
)
# Three blocks, asymmetric per-block lists (so a missing reversal on the up path changes names or shapes),
# a plain block first on the way down and cross-attention at both ends on the way up, two transformer layers
# in the up block that mirrors the first down block.
CONFIG_B: dict[str, Any] = dict(
    block_out_channels=(32, 64, 64),
    down_block_types=(
        "DownBlockSpatioTemporal",
        "CrossAttnDownBlockSpatioTemporal",
        "CrossAttnDownBlockSpatioTemporal",
    ),
    up_block_types=("CrossAttnUpBlockSpatioTemporal", "UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
    num_attention_heads=(1, 2, 4),
    cross_attention_dim=(24, 24, 24),
    layers_per_block=(2, 1, 1),
    transformer_layers_per_block=(2, 1, 1),
    addition_time_embed_dim=4,
    projection_class_embeddings_input_dim=12,
    num_frames=2,
)


def _reference(cfg: dict[str, Any], seed: int) -> torch.nn.Module:
    """diffusers model with random init, then every parameter perturbed: diffusers zero-inits some layers and sets
    every blend factor to 0.5, which would hide swapped or skipped branches."""
    torch.manual_seed(seed)
    ref = RefUNet(**cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.add_(torch.randn_like(p) * (1.0 if name.endswith("mix_factor") else 0.05))
    return ref


def _ours(ref: torch.nn.Module) -> UNet:
    ours = UNet(unet_from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours


def _inputs(batch: int, frames: int, h: int, w: int, ctx_len: int, ctx_dim: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, frames, 8, h, w, generator=g)
    timestep = torch.tensor([0.25 * torch.log(torch.tensor(700.0)).item(), -1.1])[:batch]
    context = torch.randn(batch, ctx_len, ctx_dim, generator=g)
    ids = torch.tensor([[6.0, 127.0, 0.02], [3.0, 40.0, 0.3]])[:batch]
    return sample, timestep, context, ids


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def model_a() -> tuple[torch.nn.Module, UNet]:
    ref = _reference(CONFIG_A, seed=0)
    return ref, _ours(ref)


@pytest.mark.parametrize(
    "cfg,frames,h,w,ctx_len,scalar_t",
    [
        (CONFIG_A, 3, 8, 12, 1, False),  # SVD's one-token CLIP context; frames != config.num_frames (5)
        (CONFIG_A, 2, 6, 4, 3, True),  # several context tokens take the general attention path; () timestep
        (CONFIG_B, 3, 10, 6, 2, False),  # sides not multiples of 4: upsampling must follow the skip sizes
    ],
)
def test_parity_with_diffusers(cfg: dict[str, Any], frames: int, h: int, w: int, ctx_len: int, scalar_t: bool) -> None:
    ref = _reference(cfg, seed=1)
    ours = _ours(ref)
    ctx_dim = torch.tensor(cfg["cross_attention_dim"]).reshape(-1)[0].item()
    sample, timestep, context, ids = _inputs(2, frames, h, w, ctx_len, ctx_dim, seed=2)
    if scalar_t:
        timestep = timestep[0]
    with torch.no_grad():
        expected = ref(sample, timestep, context, ids).sample
        got = ours(sample, timestep, context, ids).sample
    assert got.shape == (2, frames, 4, h, w)
    assert _rel(got, expected) < 1e-4


def test_one_token_context_skips_the_cross_attention_norms(model_a: tuple[torch.nn.Module, UNet]) -> None:
    """With SVD's one-token context the cross-attention update ignores its queries, so their LayerNorm never runs
    (the parity test above checks the numbers); with several tokens it does."""
    _, ours = model_a
    norms = [m.norm2 for m in ours.modules() if hasattr(m, "attn2")]
    calls: list[int] = []
    hooks = [n.register_forward_hook(lambda *_: calls.append(1)) for n in norms]
    try:
        with torch.no_grad():
            ours(*_inputs(2, 3, 8, 8, 1, 32, seed=3))
            assert norms and not calls
            ours(*_inputs(2, 3, 8, 8, 2, 32, seed=3))
            assert len(calls) == len(norms)
    finally:
        for h in hooks:
            h.remove()


def test_forward_chunking_changes_nothing(model_a: tuple[torch.nn.Module, UNet]) -> None:
    _, ours = model_a
    inputs = _inputs(2, 3, 8, 8, 1, 32, seed=3)
    with torch.no_grad():
        base = ours(*inputs).sample
        for chunk, dim in [(None, 0), (1, 1), (5, 1), (4, 0)]:  # 5 and 4 leave remainder slices
            ours.enable_forward_chunking(chunk, dim)
            assert _rel(ours(*inputs).sample, base) < 1e-6
        ours.disable_forward_chunking()
        assert torch.equal(ours(*inputs).sample, base)
    with pytest.raises(ValueError):
        ours.enable_forward_chunking(2, dim=2)


def test_eager_feed_forward_slicing_changes_nothing(
    model_a: tuple[torch.nn.Module, UNet], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eager runs slice large feed-forwards (FF_SLICE_ELEMENTS) on their own: a bound small enough to slice every
    block of the tiny model, including remainder slices, gives the same numbers."""
    import img2vid.unet_transformer as blocks

    _, ours = model_a
    inputs = _inputs(2, 3, 8, 8, 1, 32, seed=5)
    calls: list[int] = []  # the GEGLU projection runs once per slice, whichever way the slices are joined
    orig = blocks.GEGLU.forward
    monkeypatch.setattr(blocks.GEGLU, "forward", lambda self, x: calls.append(len(x)) or orig(self, x))
    with torch.no_grad():
        base = ours(*inputs).sample
        whole = len(calls)
        monkeypatch.setattr(blocks, "FF_SLICE_ELEMENTS", 5 * 32 * 8 * 7)  # 7 rows of 5 tokens x 32 channels
        sliced = ours(*inputs).sample
    assert len(calls) > 2 * whole  # every feed-forward really ran in several slices
    assert _rel(sliced, base) < 1e-6


def test_channels_last_gives_same_numbers(model_a: tuple[torch.nn.Module, UNet]) -> None:
    _, ours = model_a
    inputs = _inputs(2, 3, 8, 8, 1, 32, seed=4)
    cl = UNet(ours.config).eval()
    cl.load_state_dict(ours.state_dict())
    cl = cl.to_channels_last()
    assert cl.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got = cl(*inputs).sample
        assert _rel(got, ours(*inputs).sample) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_reference_rounding(model_a: tuple[torch.nn.Module, UNet], dtype: torch.dtype) -> None:
    ref, ours = model_a
    sample, timestep, context, ids = _inputs(2, 2, 8, 8, 1, 32, seed=5)
    half = UNet(ours.config).eval()
    half.load_state_dict(ours.state_dict())
    half = half.to(dtype)
    ref_half = _reference(CONFIG_A, seed=0).to(dtype)  # same weights as `ref`, cast
    with torch.no_grad():
        full = ref(sample, timestep, context, ids).sample
        half_inputs = (sample.to(dtype), timestep, context.to(dtype), ids.to(dtype))
        got = half(*half_inputs).sample
        expected = ref_half(*half_inputs).sample
    assert got.dtype == dtype
    assert torch.isfinite(got).all()
    # Our rounding error against float32 is the reference's own, give or take the order of operations.
    assert _rel(got, full) < 1.5 * _rel(expected, full) + 1e-3


def test_strict_load_rejects_missing_and_unexpected_keys(model_a: tuple[torch.nn.Module, UNet]) -> None:
    ref, _ = model_a
    sd = ref.state_dict()
    fresh = UNet(unet_from_diffusers(dict(ref.config)))
    missing = dict(sd)
    del missing["down_blocks.0.attentions.0.time_mixer.mix_factor"]
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict(missing, strict=True)
    extra = dict(sd)
    extra["down_blocks.1.attentions.0.proj_in.weight"] = torch.zeros(64, 64)  # block 1 has no transformers
    with pytest.raises(RuntimeError, match="Unexpected key"):
        fresh.load_state_dict(extra, strict=True)


def _names_shapes(m: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def test_tiny_preset_maps_to_diffusers() -> None:
    cfg = preset("tiny").unet
    torch.manual_seed(0)
    ref = RefUNet.from_config(unet_to_diffusers(cfg))
    ours = UNet(cfg)
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert unet_from_diffusers(dict(ref.config)) == cfg


@pytest.mark.parametrize("cfg", [CONFIG_A, CONFIG_B])
def test_config_round_trip(cfg: dict[str, Any]) -> None:
    ref = RefUNet(**cfg)
    ours_cfg = unet_from_diffusers(dict(ref.config))
    assert unet_from_diffusers(unet_to_diffusers(ours_cfg)) == ours_cfg
    again = RefUNet.from_config(unet_to_diffusers(ours_cfg))
    assert _names_shapes(again) == _names_shapes(ref) == _names_shapes(UNet(ours_cfg))


def test_per_block_cross_attention_dims_and_heads_names_match() -> None:
    # Construction only: with different context widths per block no single context tensor can drive a forward.
    cfg = dict(CONFIG_B, cross_attention_dim=(8, 16, 24), num_attention_heads=(4, 1, 2), layers_per_block=(1, 3, 2))
    with torch.device("meta"):
        ref = RefUNet(**cfg)
        ours = UNet(unet_from_diffusers(dict(ref.config)))
    assert _names_shapes(ours) == _names_shapes(ref)


def test_full_svd_xt_on_meta() -> None:
    cfg = preset("svd-xt").unet
    with torch.device("meta"):
        ours = UNet(cfg)
        ref = RefUNet.from_config(unet_to_diffusers(cfg))
    assert sum(p.numel() for p in ours.parameters()) == 1_524_623_082
    assert _names_shapes(ours) == _names_shapes(ref)
    assert not list(ours.buffers())
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler for inductor")
def test_compiles_fullgraph_on_cpu() -> None:
    torch.manual_seed(6)
    # Other tests compile the same code at other sizes; start clean and keep shapes static (dynamo would otherwise
    # switch to dynamic shapes on a second size, which is not what this test is about).
    torch._dynamo.reset()
    ours = UNet(preset("tiny").unet).eval()
    inputs = _inputs(1, 2, 8, 8, 1, 32, seed=6)
    compiled = torch.compile(ours, fullgraph=True, dynamic=False)
    with torch.no_grad():
        expected = ours(*inputs).sample
        got = compiled(*inputs).sample
    assert _rel(got, expected) < 1e-4


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("units", ["transformer blocks", "whole transformers", "feed-forwards", "layers"])
def test_streamed_weights_are_read_inside_their_units(
    units: str, chunked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sequential offload brings a unit's weights to the device in the unit's forward pre-hook and takes them away
    after it: a weight read outside its unit's own call would still be the CPU copy (on a GPU, a device error).
    Here the CPU copies hold NaNs and only the copies a unit's hook brings in hold the weights, so any such read
    poisons the output: the offloaded UNet must give the plain UNet's output exactly. Unit sizes as the planner
    picks them for SVD-XT's 128 MB units: at the third level the spatial and temporal transformer blocks are units
    of their own, at the first the whole spatio-temporal transformer is one. (Offloading to the CPU itself cannot
    show this: there the copies are the weights.) And units as small as single layers: modules whose forward reads
    a child's weights (`weights_read_here`, e.g. a projection whose bias the caller adds) keep that child whole.
    chunked: forward chunking on (as low-memory mode runs), whose feed-forward slices read the output projection's
    weights in the transformer block's own call."""
    from img2vid.offload import SequentialOffload
    from img2vid.unet_transformer import (
        Attention,
        FeedForward,
        SpatialTransformerBlock,
        SpatioTemporalTransformer,
        TemporalTransformerBlock,
    )

    def size(m: torch.nn.Module) -> int:
        return sum(p.numel() * p.element_size() for p in m.parameters())

    monkeypatch.setattr(SequentialOffload, "RESIDENT_BYTES", 0)
    cfg = preset("tiny").unet
    torch.manual_seed(0)
    plain = UNet(cfg).eval()
    unet = UNet(cfg).eval()
    unet.load_state_dict(plain.state_dict())
    if chunked:  # both: the same slices, so the same matrix products to the last bit
        plain.enable_forward_chunking(1)
        unet.enable_forward_chunking(1)
    kinds: tuple[type[torch.nn.Module], ...] = (SpatialTransformerBlock, TemporalTransformerBlock)
    if units == "whole transformers":
        kinds = (SpatioTemporalTransformer,)
    unit_bytes = max(size(m) for m in unet.modules() if isinstance(m, kinds))
    if units == "feed-forwards":  # a feed-forward fits a unit, its transformer block does not
        kinds = (SpatialTransformerBlock, TemporalTransformerBlock)
        unit_bytes = max(size(m) for m in unet.modules() if isinstance(m, FeedForward))
    if units == "layers":  # an attention's output projection fits a unit, the attention does not
        kinds = (torch.nn.Linear,)
        unit_bytes = max(size(m.to_out[0]) for m in unet.modules() if isinstance(m, Attention))
    offload = SequentialOffload(unet, torch.device("cpu"), unit_bytes=unit_bytes)
    if units == "feed-forwards":  # the case: a block is split (so its feed-forward could be a unit of its own)
        assert any(isinstance(m, kinds) and m not in offload.streamed for m in unet.modules())
    else:
        assert any(isinstance(m, kinds) for m in offload.streamed)  # the case this parameter is about
    weights = {p: c.clone() for p, c in offload.cpu_copies.items()}
    for c in offload.cpu_copies.values():
        c.fill_(float("nan"))  # what a parameter holds outside its unit's call
    monkeypatch.setattr(offload, "_copy", lambda m: [weights[p].clone() for p in offload.streamed[m]])
    torch.manual_seed(1)
    x = torch.randn(2, 3, cfg.in_channels, 8, 12)
    emb = torch.randn(2, 1, cfg.cross_attention_dim[0])
    ids = torch.tensor([[6.0, 127.0, 0.02]] * 2)
    with torch.no_grad():
        expected = plain(x, torch.tensor(0.5), emb, ids).sample
        out = unet(x, torch.tensor(0.5), emb, ids).sample
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("out_bias", [True, False])
def test_transformer_nchw_path_leaves_its_input_and_matches_channels_last(out_bias: bool) -> None:
    """Eager NCHW activations take the transformer's layout-preserving products (tokens read through their
    strides, proj_out adding the residual as its C operand); channels-last ones the token-layout path. Same
    numbers, and the input (the residual) is never written."""
    from img2vid.unet_transformer import SpatioTemporalTransformer

    torch.manual_seed(0)
    m = SpatioTemporalTransformer(32, 2, 16, 1, 8).eval()
    if not out_bias:
        m.proj_out.bias = None
    x, ctx = torch.randn(2 * 3, 32, 4, 5), torch.randn(2, 1, 16)
    before = x.clone()
    with torch.no_grad():
        nchw = m(x, ctx, 3)
        cl = m(x.contiguous(memory_format=torch.channels_last), ctx, 3)
    assert torch.equal(x, before)
    assert nchw.is_contiguous()
    torch.testing.assert_close(nchw, cl, rtol=1e-5, atol=1e-5)


def test_sliced_feed_forward_keeps_autograd() -> None:
    """Inference writes each feed-forward slice's rows in place (out=, which autograd cannot follow); with
    gradients on, the slices are joined the differentiable way, with the same values."""
    from img2vid.unet_transformer import FeedForward, _feed_forward

    torch.manual_seed(0)
    ff = FeedForward(16)
    x = torch.randn(6, 5, 16, requires_grad=True)
    for fold in (False, True):
        out, bias = _feed_forward(ff, x, 1, 6, fold_bias=fold)  # six slices of one row
        out.sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        x.grad = None
        with torch.no_grad():
            fast, fast_bias = _feed_forward(ff, x, 1, 6, fold_bias=fold)
        torch.testing.assert_close(fast, out.detach(), rtol=1e-6, atol=1e-6)
        assert (bias is None) == (fast_bias is None) == (not fold)
