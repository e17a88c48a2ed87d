"""Parity of our VAE with diffusers' AutoencoderKLTemporalDecoder / AutoencoderKL (oracles, test-only), float32 CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderKLTemporalDecoder

from img2vid.configs import VAEConfig, vae_from_diffusers
from img2vid.vae import VAE
from img2vid.vae_blocks import ResnetBlock2D, Upsample2D

# Reference constructor kwargs. Temporal: the brief's two shapes plus layers_per_block 3 (the mid block's zip quirk)
# with another latent width; 2D: different norm_num_groups too.
TEMPORAL_CONFIGS = [
    dict(block_out_channels=(32, 64), layers_per_block=1),
    dict(block_out_channels=(32, 32, 64), layers_per_block=2, latent_channels=4),
    dict(block_out_channels=(32, 64), layers_per_block=3, latent_channels=6),
]
IMAGE_CONFIGS = [
    dict(block_out_channels=(32, 64), layers_per_block=1),
    dict(block_out_channels=(32, 32, 64), layers_per_block=2, latent_channels=4, norm_num_groups=8),
]


def _kwargs(cls: type, cfg: dict) -> dict:
    n = len(cfg["block_out_channels"])
    blocks = {"down_block_types": ("DownEncoderBlock2D",) * n}
    if cls is AutoencoderKL:
        blocks["up_block_types"] = ("UpDecoderBlock2D",) * n
    return {**blocks, **cfg}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).double().norm() / ref.double().norm()).item()


def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Random offsets on every parameter: zero-inits (mix_factor, biases) would hide mapping bugs. The mixing logits
    get large values so that a reversed spatial/temporal blend could not pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mix_factor"):
                p.copy_(torch.randn(p.shape, generator=g) * 2.0)
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def reference(cls: type, cfg: dict, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = cls(**_kwargs(cls, cfg))
    perturb_(model, seed + 100)
    return model.eval()


def ours_from(ref: torch.nn.Module, config: VAEConfig) -> VAE:
    with torch.device("meta"):
        model = VAE(config)
    model.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return model.eval()


def config_of(ref: torch.nn.Module) -> VAEConfig:
    # to_json_string is what a config.json on disk holds (with `_class_name`), unlike the in-memory `model.config`.
    return vae_from_diffusers(json.loads(ref.to_json_string()))


def shapes(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize("cfg", TEMPORAL_CONFIGS, ids=lambda c: f"{c['block_out_channels']}-l{c['layers_per_block']}")
def test_temporal_parity(cfg: dict) -> None:
    ref = reference(AutoencoderKLTemporalDecoder, cfg, seed=len(cfg["block_out_channels"]) + cfg["layers_per_block"])
    config = config_of(ref)
    assert config.temporal_decoder
    ours = ours_from(ref, config)
    down = 2 ** (len(cfg["block_out_channels"]) - 1)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 5 * down, 9 * down, generator=g) * 2 - 1  # non-square
    frames = 3
    z = torch.randn(2 * frames, config.latent_channels, 5, 7, generator=g)  # two videos of 3 frames
    with torch.no_grad():
        enc_ref = ref.encode(x).latent_dist.mode()
        enc = ours.encode_mean(x)
        dec_ref = ref.decode(z, num_frames=frames).sample
        dec = ours.decode_frames(z, num_frames=frames)
    assert enc.shape == enc_ref.shape == (3, config.latent_channels, 5, 9)
    assert rel_err(enc, enc_ref) < 1e-4
    assert dec.shape == dec_ref.shape == (2 * frames, 3, 5 * down, 7 * down)
    assert rel_err(dec, dec_ref) < 1e-4

    # The temporal layers really mix frames, and only within a video: decoding the videos one by one is the same,
    # decoding them as single frames is not.
    with torch.no_grad():
        per_video = torch.cat([ours.decode_frames(z[:frames], frames), ours.decode_frames(z[frames:], frames)])
        per_frame = ours.decode_frames(z, num_frames=1)
    assert rel_err(per_video, dec) < 1e-5
    assert rel_err(per_frame, dec) > 1e-3


@pytest.mark.parametrize("cfg", IMAGE_CONFIGS, ids=lambda c: f"{c['block_out_channels']}-l{c['layers_per_block']}")
def test_image_decoder_parity(cfg: dict) -> None:
    ref = reference(AutoencoderKL, cfg, seed=7 + cfg["layers_per_block"])
    config = config_of(ref)
    assert not config.temporal_decoder
    ours = ours_from(ref, config)
    down = 2 ** (len(cfg["block_out_channels"]) - 1)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 3 * down, 5 * down, generator=g) * 2 - 1
    z = torch.randn(4, config.latent_channels, 6, 4, generator=g)
    with torch.no_grad():
        enc_ref = ref.encode(x).latent_dist.mode()
        enc = ours.encode_mean(x)
        dec_ref = ref.decode(z).sample
        dec = ours.decode_frames(z, num_frames=2)  # ignored by the 2D decoder
    assert enc.shape == enc_ref.shape == (2, config.latent_channels, 3, 5)
    assert rel_err(enc, enc_ref) < 1e-4
    assert dec.shape == dec_ref.shape
    assert rel_err(dec, dec_ref) < 1e-4


def _conv2d_weights_channels_last(model: torch.nn.Module) -> None:
    """The 2D conv weights alone in channels_last (Module.to(memory_format=...) refuses Conv3d weights; these tests
    check that channels_last *activations* go through the temporal layers' views, so the 5D weights stay as is)."""
    for p in model.parameters():
        if p.dim() == 4:
            p.data = p.data.contiguous(memory_format=torch.channels_last)


def test_channels_last_same_numbers() -> None:
    """channels_last activations (the fast GPU layout) go through the transposed 5D views unchanged."""
    cfg = TEMPORAL_CONFIGS[1]
    ref = reference(AutoencoderKLTemporalDecoder, cfg, seed=3)
    ours = ours_from(ref, config_of(ref))
    z = torch.randn(4, 4, 6, 5, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = ours.decode_frames(z, num_frames=2)
        _conv2d_weights_channels_last(ours)
        fast = ours.decode_frames(z.contiguous(memory_format=torch.channels_last), num_frames=2)
    assert rel_err(fast, plain) < 1e-5


def test_decode_rejects_partial_video() -> None:
    with torch.device("meta"):
        model = VAE(VAEConfig(block_out_channels=(32, 64), layers_per_block=1))
    with pytest.raises(ValueError, match="whole number"):
        model.decode_frames(torch.zeros(5, 4, 4, 4, device="meta"), num_frames=2)


@pytest.mark.parametrize("cls", [AutoencoderKLTemporalDecoder, AutoencoderKL])
def test_strict_loading(cls: type) -> None:
    ref = reference(cls, IMAGE_CONFIGS[0], seed=0)
    sd = ref.state_dict()
    config = config_of(ref)
    missing = dict(sd)
    missing.pop(next(k for k in sd if "attentions.0.to_k.bias" in k))
    with torch.device("meta"):
        model = VAE(config)
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict(missing, strict=True, assign=True)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        model.load_state_dict({**sd, "decoder.extra.weight": torch.zeros(1)}, strict=True, assign=True)
    with pytest.raises(RuntimeError, match="size mismatch"):
        VAE(config).load_state_dict({**sd, "quant_conv.bias": torch.zeros(3)}, strict=True)


@pytest.mark.parametrize(
    "cls,cfg",
    [(AutoencoderKLTemporalDecoder, c) for c in TEMPORAL_CONFIGS] + [(AutoencoderKL, c) for c in IMAGE_CONFIGS],
)
def test_config_from_diffusers_builds_same_names(cls: type, cfg: dict) -> None:
    with torch.device("meta"):
        ref = cls(**_kwargs(cls, cfg))
        # The in-memory config of the temporal class carries no `_class_name`; temporal is the default.
        config = vae_from_diffusers(dict(ref.config)) if cls is AutoencoderKLTemporalDecoder else config_of(ref)
        ours = VAE(config)
    assert config.temporal_decoder == (cls is AutoencoderKLTemporalDecoder)
    assert shapes(ours.state_dict()) == shapes(ref.state_dict())


def test_full_svd_vae_on_meta() -> None:
    config = VAEConfig()
    with torch.device("meta"):
        ours = VAE(config)
        ref = AutoencoderKLTemporalDecoder(
            down_block_types=("DownEncoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            sample_size=768,
        )
    assert shapes(ours.state_dict()) == shapes(ref.state_dict())
    assert all(p.is_meta for p in ours.parameters())
    assert not list(ours.buffers())  # nothing to fill besides the checkpoint's tensors
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours.encoder) == 34_163_592
    assert count(ours.decoder) == 63_579_183
    assert count(ours.quant_conv) == 72


def test_import_does_not_pull_oracles() -> None:
    code = "import sys, img2vid.vae; assert 'diffusers' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_autograd_through_in_place_ops() -> None:
    """The memory-saving in-place SiLU / residual adds must not break backward (no version-counter errors)."""
    torch.manual_seed(0)
    model = VAE(VAEConfig(block_out_channels=(32, 64), layers_per_block=2))
    x = torch.rand(2, 3, 16, 24, requires_grad=True)
    z = model.encode_mean(x)
    out = model.decode_frames(z, num_frames=2)
    out.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("chunk", [None, 1], ids=["whole", "sliced"])
@pytest.mark.parametrize("temporal", [True, False])
def test_forward_hooks_see_every_heavy_layer(temporal: bool, chunk: int | None) -> None:
    """Sequential offload streams weights from forward hooks, so every module that owns weights must either have its
    forward run, or be a ModuleList/ModuleDict container (whose layers are hooked instead), or be a tiny parameter
    holder read by its parent (the blend logit, the temporal GroupNorms that video_group_norm reads, the temporal
    convs that temporal_conv reads as matrices, the resnets' convs that layers.conv2d reads without their biases:
    their parent's forward runs, so its hook sees them; the upsamplers' convs, likewise)."""
    model = VAE(VAEConfig(block_out_channels=(32, 64), layers_per_block=2, temporal_decoder=temporal)).eval()
    model.spatial_frame_chunk = chunk  # slices (and upsamplers run inside them) still go through each forward
    ran: set[str] = set()
    for name, m in model.named_modules():
        m.register_forward_hook(lambda mod, args, out, name=name: ran.add(name))
    with torch.no_grad():
        model.decode_frames(model.encode_mean(torch.rand(4, 3, 16, 24)), num_frames=2)
    silent_names = [
        name
        for name, m in model.named_modules()
        if name and name not in ran and not isinstance(m, (torch.nn.ModuleList, torch.nn.ModuleDict))
    ]
    silent = {type(model.get_submodule(n)).__name__ for n in silent_names}
    assert silent <= {"AlphaBlender", "GroupNorm", "Conv3d", "Conv2d"}
    for n in silent_names:
        parent, leaf = n.rsplit(".", 1)
        if isinstance(model.get_submodule(n), torch.nn.Conv3d):
            assert parent.endswith("temporal_res_block") and parent in ran
        if isinstance(model.get_submodule(n), torch.nn.Conv2d):  # a resnet's or upsampler's convs, layers.conv2d's
            owner = model.get_submodule(parent)
            assert isinstance(owner, (ResnetBlock2D, Upsample2D)) and parent in ran, n
            assert leaf in owner.weights_read_here, n
    assert ("AlphaBlender" in silent) == temporal


@pytest.mark.parametrize(
    "cls,cfg",
    [(AutoencoderKLTemporalDecoder, TEMPORAL_CONFIGS[1]), (AutoencoderKL, IMAGE_CONFIGS[1])],
    ids=["temporal", "2d"],
)
def test_spatial_frame_chunk_same_numbers(cls: type, cfg: dict) -> None:
    """Running the up blocks' per-frame layers a few frames at a time changes no number: slices of 1, 2 and 4 of
    2 videos x 3 frames (4 divides neither the video nor the batch, so a slice spans two videos), and the result
    still matches diffusers."""
    ref = reference(cls, cfg, seed=11)
    ours = ours_from(ref, config_of(ref))
    frames = 3
    z = torch.randn(2 * frames, 4, 5, 7, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        temporal = cls is AutoencoderKLTemporalDecoder
        dec_ref = (ref.decode(z, num_frames=frames) if temporal else ref.decode(z)).sample
        whole = ours.decode_frames(z, num_frames=frames)
        for chunk in (1, 2, 4, 6, 100):
            ours.spatial_frame_chunk = chunk
            sliced = ours.decode_frames(z, num_frames=frames)
            assert sliced.shape == whole.shape
            assert rel_err(sliced, whole) < 1e-6, chunk
            assert rel_err(sliced, dec_ref) < 1e-4, chunk
    if temporal:
        # The temporal layers still see whole videos: slicing is not the same as decoding frames alone.
        assert rel_err(whole, ours.decode_frames(z, num_frames=1)) > 1e-3


def test_spatial_frame_chunk_channels_last_and_rejects_zero() -> None:
    """The sliced output keeps the channels_last layout (the temporal layers' views stay free) and the numbers."""
    cfg = TEMPORAL_CONFIGS[1]
    ref = reference(AutoencoderKLTemporalDecoder, cfg, seed=5)
    ours = ours_from(ref, config_of(ref))
    z = torch.randn(4, 4, 6, 5, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        plain = ours.decode_frames(z, num_frames=2)
        _conv2d_weights_channels_last(ours)
        ours.spatial_frame_chunk = 3
        seen: list[bool] = []
        temporal_half = ours.decoder.up_blocks[-1].resnets[0].temporal_res_block
        hook = temporal_half.register_forward_pre_hook(
            lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
        )
        fast = ours.decode_frames(z.contiguous(memory_format=torch.channels_last), num_frames=2)
        hook.remove()
    assert seen == [True]
    assert rel_err(fast, plain) < 1e-5
    ours.spatial_frame_chunk = 0
    with pytest.raises(ValueError, match="spatial_frame_chunk"):
        ours.decode_frames(z, num_frames=2)


@pytest.mark.parametrize("temporal", [True, False])
def test_streamed_weights_are_read_inside_their_units(temporal: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """As the UNet's test of the same name: the offloaded CPU copies hold NaNs and only a unit's own hook brings the
    weights in, with units as small as single layers (every weight streamed), so any weight read outside the call
    of its unit (or of a module that names it in `weights_read_here`) poisons the frames."""
    from img2vid.offload import SequentialOffload

    def size(m: torch.nn.Module) -> int:
        return sum(p.numel() * p.element_size() for p in m.parameters())

    monkeypatch.setattr(SequentialOffload, "RESIDENT_BYTES", 0)
    torch.manual_seed(0)
    cfg = VAEConfig(block_out_channels=(32, 64), layers_per_block=2, temporal_decoder=temporal)
    plain = VAE(cfg).eval()
    perturb_(plain, 1)
    model = VAE(cfg).eval()
    model.load_state_dict(plain.state_dict())
    # Units the size of the widest temporal (or, 2D, spatial) conv: the resnets that read their layers' weights
    # (`weights_read_here`) are split, and every other layer that fits streams on its own
    kind = torch.nn.Conv3d if temporal else torch.nn.Conv2d
    unit_bytes = max(size(m) for m in model.modules() if isinstance(m, kind))
    offload = SequentialOffload(model, torch.device("cpu"), unit_bytes=unit_bytes)
    split = [m for m in model.modules() if getattr(m, "weights_read_here", ()) and size(m) > unit_bytes]
    assert split and len(offload.streamed) > 10
    weights = {p: c.clone() for p, c in offload.cpu_copies.items()}
    for c in offload.cpu_copies.values():
        c.fill_(float("nan"))
    monkeypatch.setattr(offload, "_copy", lambda m: [weights[p].clone() for p in offload.streamed[m]])
    x = torch.rand(4, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        expected = plain.decode_frames(plain.encode_mean(x), num_frames=2)
        out = model.decode_frames(model.encode_mean(x), num_frames=2)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("channels_last", [True, False])
def test_temporal_resnet_biases_folded_on_gpu(channels_last: bool) -> None:
    """Where the time mixer's kernel runs, the temporal resnet's conv biases are added by the passes after the convs
    (the second norm, the blend): the result equals the reference's ops run one by one on the same norms and convs,
    bit for bit, in the decoder's channels-last layout and in NCHW (streamed weights)."""
    from img2vid import fused
    from img2vid.layers import channels_last_, temporal_conv, video_group_norm
    from img2vid.vae_blocks import TemporalResnetBlock

    torch.manual_seed(0)
    block = TemporalResnetBlock(64, 32).cuda().half().eval()
    with torch.no_grad():
        for p in block.parameters():  # non-trivial biases and affine norms
            p.copy_(torch.randn_like(p) * 0.2)
        for norm in (block.norm1, block.norm2):
            norm.weight.add_(1.0)
    channels_last_(block, channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2 * 5, 64, 12, 20, device="cuda").half().contiguous(memory_format=fmt)  # 2 videos of 5 frames
    s = torch.sigmoid(torch.tensor([0.3], device="cuda")).half()
    with torch.no_grad():
        got = block(x, 5, s)
        x5 = x.unflatten(0, (-1, 5)).transpose(1, 2)  # (B, C, F, H, W)
        # the conv, then its bias in an op of its own, as PyTorch adds a cuDNN conv's bias
        conv = lambda h, c: temporal_conv(h, c, add_bias=False) + c.bias.view(-1, 1, 1, 1)  # noqa: E731
        h = conv(video_group_norm(x5, block.norm1, silu=True), block.conv1)
        h = conv(video_group_norm(h, block.norm2, silu=True), block.conv2)
        alpha = 1.0 - s
        want = (alpha * x5 + (1.0 - alpha) * (x5 + h)).transpose(1, 2).flatten(0, 1)
    if fused._kernels_run_on(torch.device("cuda")):
        assert torch.equal(got, want)
    else:  # the algebraic form x + s * h
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
