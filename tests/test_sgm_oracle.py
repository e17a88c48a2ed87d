"""The sgm key table against independent facts, not against itself: (1) diffusers' own single-file converters for
Stable Diffusion (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`), which place every sgm block index
(input_blocks / middle_block / output_blocks, the VAE's up.{n-1-u} levels) where diffusers puts it, and (2) literal
sgm <-> diffusers name pairs of the real svd_xt files, for what those SD converters do not know (the video parts,
CLIP). The round-trip tests in test_checkpoint.py cannot see a swap of two same-shape entries; these can.

Every tensor carries a distinct one-element tag, so a name that lands in the wrong place shows up as a wrong tag.
"""

from __future__ import annotations

import gzip
import json
import re

import pytest
import torch
from test_checkpoint import KEYS_JSON, meta_state_dicts

from img2vid.configs import PipelineConfig, preset
from img2vid.sgm_convert import components_to_sgm, sgm_to_components

SVD_XT = preset("svd-xt")


@pytest.fixture(scope="module")
def real_keys() -> dict:
    return json.loads(gzip.decompress(KEYS_JSON.read_bytes()))


def constant(shape: list[int], value: float) -> torch.Tensor:
    """A full-size tensor of one value that takes no memory (svd_xt is 2.1 billion numbers)."""
    return torch.tensor(value).expand(shape)


def tagged(config: PipelineConfig, component: str) -> dict[str, torch.Tensor]:
    """Our state dict for one component at full size, each tensor replaced by a distinct one-element tag."""
    names = sorted(meta_state_dicts(config, True)[component])
    return {n: torch.tensor([float(i)]) for i, n in enumerate(names)}


def tags(sd: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(t.flatten()[0]) for k, t in sd.items()}


# diffusers' SD converters name a resnet's and a transformer's inner tensors as a 2D UNet's; SVD nests them one level
# deeper (spatial_res_block / temporal_res_block, temporal_transformer_blocks). These rewrite only that inner part:
# every block index stays the converter's.
def svd_unet_name(name: str) -> str:
    if m := re.match(r"(.*\.resnets\.\d+\.)(.*)", name):
        block, rest = m.groups()
        if rest.startswith("time_stack."):
            return block + "temporal_res_block." + rest[len("time_stack.") :]
        return block + (rest if rest.startswith("time_mixer.") else "spatial_res_block." + rest)
    if m := re.match(r"(.*\.attentions\.\d+\.)(.*)", name):
        block, rest = m.groups()
        rest = re.sub(r"^time_stack\.", "temporal_transformer_blocks.", rest)
        rest = re.sub(r"^time_pos_embed\.0\.", "time_pos_embed.linear_1.", rest)
        return block + re.sub(r"^time_pos_embed\.2\.", "time_pos_embed.linear_2.", rest)
    return name


_VAE_TEMPORAL = {
    "in_layers.0.": "norm1.",
    "in_layers.2.": "conv1.",
    "out_layers.0.": "norm2.",
    "out_layers.3.": "conv2.",
}


def svd_vae_name(name: str) -> str:
    if m := re.match(r"(decoder\..*resnets\.\d+\.)(.*)", name):  # the temporal decoder's resnets are video resnets
        block, rest = m.groups()
        if rest == "mix_factor":
            return block + "time_mixer.mix_factor"
        if rest.startswith("time_stack."):
            inner = rest[len("time_stack.") :]
            for sgm, ours in _VAE_TEMPORAL.items():
                inner = inner.replace(sgm, ours) if inner.startswith(sgm) else inner
            return block + "temporal_res_block." + inner
        return block + "spatial_res_block." + rest
    return name


def test_unet_table_places_every_block_as_diffusers_single_file_converter_does():
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    ours = tagged(SVD_XT, "unet")
    sgm = components_to_sgm({"unet": ours}, SVD_XT)
    theirs = convert_ldm_unet_checkpoint(
        dict(sgm), {"layers_per_block": 2, "class_embed_type": None, "addition_embed_type": "text_time"}
    )
    # label_emb.0.* is SVD's added-time embedding, which diffusers' SD mapping names add_embedding
    theirs = {svd_unet_name(k): t for k, t in theirs.items()}
    assert set(theirs) == set(ours), sorted(set(theirs) ^ set(ours))[:6]
    assert tags(theirs) == tags(ours)


@pytest.mark.parametrize("temporal", [True, False], ids=["temporal-decoder", "image-decoder"])
def test_vae_table_places_every_block_as_diffusers_single_file_converter_does(temporal):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from img2vid.configs import replace

    config = replace(SVD_XT, vae=replace(SVD_XT.vae, temporal_decoder=temporal))
    ours = tagged(config, "vae")
    if (
        temporal
    ):  # no place in sgm's video autoencoder (see sgm_convert._temporal_quant_conv); tested in test_checkpoint
        del ours["quant_conv.weight"], ours["quant_conv.bias"]
    sgm = components_to_sgm({"vae": ours}, config)
    n = len(config.vae.block_out_channels)
    theirs = convert_ldm_vae_checkpoint(dict(sgm), {"down_block_types": [None] * n, "up_block_types": [None] * n})
    theirs = {svd_vae_name(k) if temporal else k: t for k, t in theirs.items()}
    if temporal:  # the SD converter has no conv_out video twin; its one pair is pinned in PAIRS below
        for x in ("weight", "bias"):
            theirs[f"decoder.time_conv_out.{x}"] = sgm[f"first_stage_model.decoder.conv_out.time_mix_conv.{x}"]
    assert set(theirs) == set(ours), sorted(set(theirs) ^ set(ours))[:6]
    assert tags(theirs) == tags(ours)


# Literal pairs from the real svd_xt files (svd_xt_keys.json) and diffusers' convert_svd_to_diffusers.py: one per kind
# of place the SD converters above do not cover, plus the block indices most easily confused.
PAIRS = {
    "model.diffusion_model.middle_block.0.in_layers.0.weight": (
        "unet",
        "mid_block.resnets.0.spatial_res_block.norm1.weight",
    ),
    "model.diffusion_model.middle_block.2.time_stack.out_layers.3.weight": (
        "unet",
        "mid_block.resnets.1.temporal_res_block.conv2.weight",
    ),
    "model.diffusion_model.middle_block.2.time_mixer.mix_factor": ("unet", "mid_block.resnets.1.time_mixer.mix_factor"),
    "model.diffusion_model.middle_block.1.time_stack.0.attn1.to_q.weight": (
        "unet",
        "mid_block.attentions.0.temporal_transformer_blocks.0.attn1.to_q.weight",
    ),
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (
        "unet",
        "down_blocks.1.resnets.0.spatial_res_block.conv_shortcut.weight",
    ),
    "model.diffusion_model.input_blocks.3.0.op.weight": ("unet", "down_blocks.0.downsamplers.0.conv.weight"),
    "model.diffusion_model.input_blocks.11.0.time_stack.emb_layers.1.bias": (
        "unet",
        "down_blocks.3.resnets.1.temporal_res_block.time_emb_proj.bias",
    ),
    "model.diffusion_model.input_blocks.1.1.time_pos_embed.2.weight": (
        "unet",
        "down_blocks.0.attentions.0.time_pos_embed.linear_2.weight",
    ),
    "model.diffusion_model.output_blocks.2.1.conv.weight": ("unet", "up_blocks.0.upsamplers.0.conv.weight"),
    "model.diffusion_model.output_blocks.5.2.conv.weight": ("unet", "up_blocks.1.upsamplers.0.conv.weight"),
    "model.diffusion_model.output_blocks.11.1.time_mixer.mix_factor": (
        "unet",
        "up_blocks.3.attentions.2.time_mixer.mix_factor",
    ),
    "model.diffusion_model.label_emb.0.2.weight": ("unet", "add_embedding.linear_2.weight"),
    "first_stage_model.decoder.up.3.block.0.time_stack.in_layers.2.weight": (
        "vae",
        "decoder.up_blocks.0.resnets.0.temporal_res_block.conv1.weight",
    ),
    "first_stage_model.decoder.up.0.block.2.mix_factor": ("vae", "decoder.up_blocks.3.resnets.2.time_mixer.mix_factor"),
    "first_stage_model.decoder.mid.block_1.nin_shortcut.weight": ("vae", None),  # no shortcut: same width
    "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight": (
        "vae",
        "decoder.up_blocks.2.resnets.0.spatial_res_block.conv_shortcut.weight",
    ),
    "first_stage_model.decoder.conv_out.time_mix_conv.weight": ("vae", "decoder.time_conv_out.weight"),
    "first_stage_model.encoder.mid.attn_1.proj_out.weight": ("vae", "encoder.mid_block.attentions.0.to_out.0.weight"),
    "conditioner.embedders.0.open_clip.model.visual.transformer.resblocks.31.mlp.c_proj.bias": (
        "image_encoder",
        "vision_model.encoder.layers.31.mlp.fc2.bias",
    ),
    "conditioner.embedders.0.open_clip.model.visual.ln_pre.weight": (
        "image_encoder",
        "vision_model.pre_layrnorm.weight",
    ),
    "conditioner.embedders.0.open_clip.model.visual.positional_embedding": (
        "image_encoder",
        "vision_model.embeddings.position_embedding.weight",
    ),
}


def test_literal_sgm_names_land_where_the_real_files_put_them(real_keys):
    real = real_keys["svd_xt"]["tensors"]
    full = {k: constant(v[0], float(i)) for i, (k, v) in enumerate(real.items())}
    ours = sgm_to_components(full, SVD_XT)
    for sgm, (component, name) in PAIRS.items():
        if name is None:
            assert sgm not in real
            continue
        assert sgm in real, sgm
        got = ours[component][name]
        assert got.flatten()[0] == full[sgm].flatten()[0] and got.numel() == full[sgm].numel(), (sgm, name)


def test_open_clip_fused_attention_splits_in_q_k_v_order_and_projection_transposes(real_keys):
    """open_clip's in_proj is q, k, v stacked on dim 0 (torch.nn.MultiheadAttention); visual.proj is x @ proj."""
    p = "conditioner.embedders.0.open_clip.model.visual."
    real = real_keys["svd_xt"]["tensors"]
    full = {k: constant(v[0], 0.0) for k, v in real.items()}
    w = torch.arange(3 * 1280 * 1280, dtype=torch.float32).reshape(3 * 1280, 1280)
    full[p + "transformer.resblocks.7.attn.in_proj_weight"] = w
    full[p + "proj"] = torch.randn(1280, 1024)
    enc = sgm_to_components(full, SVD_XT)["image_encoder"]
    for i, part in enumerate("qkv"):
        assert torch.equal(
            enc[f"vision_model.encoder.layers.7.self_attn.{part}_proj.weight"], w[i * 1280 : (i + 1) * 1280]
        )
    x = torch.randn(2, 1280)
    # the same product summed in another order: float32 rounding only
    torch.testing.assert_close(
        x @ full[p + "proj"], torch.nn.functional.linear(x, enc["visual_projection.weight"]), rtol=1e-5, atol=1e-3
    )
