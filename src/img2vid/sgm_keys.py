"""The one key table between Stability's original single files (sgm layout: svd*.safetensors) and our names.

Our names are diffusers' (UNet, VAE) and transformers' (CLIP image tower) state-dict names. The table is data: per
kind of block, a tuple of (sgm name, our name[, transform]) pairs; `key_table(config)` lays those blocks out at the
indices sgm and diffusers give them for one config. A name ending in "." is a prefix (the rest of the key is carried
over unchanged); any other name is one whole tensor. Facts from /work/shared/reference/svd_xt_keys.json and SVD.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from img2vid.configs import CLIPVisionConfig, PipelineConfig, UNetConfig, VAEConfig

COMPONENTS = ("unet", "vae", "image_encoder")
SGM_PREFIX = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "image_encoder": "conditioner.embedders.0.open_clip.model.visual.",
}
_OPEN_CLIP = "conditioner.embedders.0.open_clip.model."
# Stored in the real files and never used for image-to-video: open_clip's text side, and the conditioning-frame
# autoencoder (conditioner.embedders.3: encoder, 2D decoder, quant convs); like diffusers we encode the conditioning
# frame with first_stage_model.encoder (see `_temporal_quant_conv` for the one tensor we may take from it).
UNUSED_KEYS = frozenset(
    _OPEN_CLIP + k
    for k in ("token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias")
    + ("text_projection", "logit_scale")
)
UNUSED_PREFIX = "conditioner.embedders.3."
# A buffer older transformers saved in the image encoder (an arange over the positions); ours adds the whole position
# table instead, so it is dropped on loading and never written.
POSITION_IDS = "vision_model.embeddings.position_ids"
COND_AE = "conditioner.embedders.3.encoder."

# Tensor transforms (sgm -> ours; each has an exact inverse).
COPY = "copy"
CONV1X1 = "conv1x1"  # sgm VAE attention q/k/v/proj_out are 1x1 convs (C, C, 1, 1); diffusers' are linear (C, C)
TRANSPOSE = "transpose"  # open_clip visual.proj is (hidden, proj); transformers' visual_projection (proj, hidden)
QKV = "qkv"  # open_clip's fused attn.in_proj_{weight,bias} (3C, ...) = q, k, v stacked; ours "{}" -> q / k / v


@dataclass(frozen=True)
class Entry:
    component: str
    sgm: str  # the full sgm name (prefix or tensor)
    ours: str  # our name inside the component; for QKV a template with "{}" for q / k / v
    transform: str = COPY


# ---- the inner names of each kind of block: (sgm, ours[, transform]) ------------------------------------------------
UNET_TOP = (
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    ("label_emb.0.0.", "add_embedding.linear_1."),
    ("label_emb.0.2.", "add_embedding.linear_2."),
    ("input_blocks.0.0.", "conv_in."),
    ("out.0.", "conv_norm_out."),
    ("out.2.", "conv_out."),
)
UNET_RESNET = (  # sgm VideoResBlock = ResBlock + time_stack (its temporal twin) + time_mixer
    ("in_layers.0.", "spatial_res_block.norm1."),
    ("in_layers.2.", "spatial_res_block.conv1."),
    ("emb_layers.1.", "spatial_res_block.time_emb_proj."),
    ("out_layers.0.", "spatial_res_block.norm2."),
    ("out_layers.3.", "spatial_res_block.conv2."),
    ("skip_connection.", "spatial_res_block.conv_shortcut."),
    ("time_stack.in_layers.0.", "temporal_res_block.norm1."),
    ("time_stack.in_layers.2.", "temporal_res_block.conv1."),
    ("time_stack.emb_layers.1.", "temporal_res_block.time_emb_proj."),
    ("time_stack.out_layers.0.", "temporal_res_block.norm2."),
    ("time_stack.out_layers.3.", "temporal_res_block.conv2."),
    ("time_mixer.mix_factor", "time_mixer.mix_factor"),
)
UNET_TRANSFORMER = (  # sgm SpatialVideoTransformer; the transformer blocks inside keep diffusers' names
    ("norm.", "norm."),
    ("proj_in.", "proj_in."),
    ("proj_out.", "proj_out."),
    ("transformer_blocks.", "transformer_blocks."),
    ("time_stack.", "temporal_transformer_blocks."),
    ("time_pos_embed.0.", "time_pos_embed.linear_1."),
    ("time_pos_embed.2.", "time_pos_embed.linear_2."),
    ("time_mixer.mix_factor", "time_mixer.mix_factor"),
)
VAE_TOP = (("conv_in.", "conv_in."), ("norm_out.", "conv_norm_out."), ("conv_out.", "conv_out."))
VAE_RESNET = (
    ("norm1.", "norm1."),
    ("conv1.", "conv1."),
    ("norm2.", "norm2."),
    ("conv2.", "conv2."),
    ("nin_shortcut.", "conv_shortcut."),
)
VAE_VIDEO_RESNET = tuple((s, "spatial_res_block." + o) for s, o in VAE_RESNET) + (
    ("time_stack.in_layers.0.", "temporal_res_block.norm1."),
    ("time_stack.in_layers.2.", "temporal_res_block.conv1."),
    ("time_stack.out_layers.0.", "temporal_res_block.norm2."),
    ("time_stack.out_layers.3.", "temporal_res_block.conv2."),
    ("mix_factor", "time_mixer.mix_factor"),
)
VAE_ATTENTION = (("norm.", "group_norm."),) + tuple(
    pair
    for s, o in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0"))
    for pair in ((f"{s}.weight", f"{o}.weight", CONV1X1), (f"{s}.bias", f"{o}.bias"))
)
CLIP_TOP = (
    ("class_embedding", "vision_model.embeddings.class_embedding"),
    ("positional_embedding", "vision_model.embeddings.position_embedding.weight"),
    ("conv1.", "vision_model.embeddings.patch_embedding."),
    ("ln_pre.", "vision_model.pre_layrnorm."),
    ("ln_post.", "vision_model.post_layernorm."),
    ("proj", "visual_projection.weight", TRANSPOSE),
)
CLIP_LAYER = (
    ("ln_1.", "layer_norm1."),
    ("ln_2.", "layer_norm2."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
    ("attn.out_proj.", "self_attn.out_proj."),
    ("attn.in_proj_weight", "self_attn.{}_proj.weight", QKV),
    ("attn.in_proj_bias", "self_attn.{}_proj.bias", QKV),
)
WHOLE = (("", ""),)  # a block whose names are the same on both sides (up/down-sampler convs)


def few(names: list[str], n: int = 3) -> str:
    """The first few names of a list, for one-line messages."""
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def _block(component: str, sgm: str, ours: str, inner: Iterable[tuple[str, ...]]) -> list[Entry]:
    return [Entry(component, sgm + s, ours + o, *rest) for s, o, *rest in inner]


# ---- block layout for a config ------------------------------------------------------------------------------------
def unet_entries(c: UNetConfig) -> list[Entry]:
    """sgm: input_blocks.0 = conv_in, then per level its resnets (+ transformer at .1) and a downsampler entry
    (.0.op) except on the last level; middle_block.0/1/2; output_blocks per level (deepest first) with one resnet more
    and the upsampler (.1, or .2 after a transformer) on each level's last entry except the final level."""
    p, n = SGM_PREFIX["unet"], len(c.block_out_channels)
    out = _block("unet", p, "", UNET_TOP)
    i = 1
    for b in range(n):
        for j in range(c.layers_per_block[b]):
            out += _block("unet", f"{p}input_blocks.{i}.0.", f"down_blocks.{b}.resnets.{j}.", UNET_RESNET)
            if c.down_cross_attention[b]:
                out += _block("unet", f"{p}input_blocks.{i}.1.", f"down_blocks.{b}.attentions.{j}.", UNET_TRANSFORMER)
            i += 1
        if b < n - 1:
            out += _block("unet", f"{p}input_blocks.{i}.0.op.", f"down_blocks.{b}.downsamplers.0.conv.", WHOLE)
            i += 1
    out += _block("unet", f"{p}middle_block.0.", "mid_block.resnets.0.", UNET_RESNET)
    out += _block("unet", f"{p}middle_block.1.", "mid_block.attentions.0.", UNET_TRANSFORMER)
    out += _block("unet", f"{p}middle_block.2.", "mid_block.resnets.1.", UNET_RESNET)
    k, up_layers = 0, c.layers_per_block[::-1]
    for u in range(n):
        cross = c.up_cross_attention[u]
        for j in range(up_layers[u] + 1):
            out += _block("unet", f"{p}output_blocks.{k}.0.", f"up_blocks.{u}.resnets.{j}.", UNET_RESNET)
            if cross:
                out += _block("unet", f"{p}output_blocks.{k}.1.", f"up_blocks.{u}.attentions.{j}.", UNET_TRANSFORMER)
            if u < n - 1 and j == up_layers[u]:
                up = f"{p}output_blocks.{k}.{2 if cross else 1}.conv."
                out += _block("unet", up, f"up_blocks.{u}.upsamplers.0.conv.", WHOLE)
            k += 1
    return out


def _vae_mid(sgm: str, ours: str, resnet: tuple[tuple[str, ...], ...]) -> list[Entry]:
    return (
        _block("vae", sgm + "mid.block_1.", ours + "mid_block.resnets.0.", resnet)
        + _block("vae", sgm + "mid.attn_1.", ours + "mid_block.attentions.0.", VAE_ATTENTION)
        + _block("vae", sgm + "mid.block_2.", ours + "mid_block.resnets.1.", resnet)
    )


def vae_entries(c: VAEConfig) -> list[Entry]:
    """sgm numbers the decoder's levels like the encoder's (up.0 = full resolution), diffusers in decoding order
    (up_blocks.0 = deepest), so decoder level u is sgm up.{n-1-u}. The temporal decoder has no quant convs (see
    `_temporal_quant_conv`) and its last conv's (3,1,1) video twin is conv_out.time_mix_conv."""
    e, d, n = "first_stage_model.encoder.", "first_stage_model.decoder.", len(c.block_out_channels)
    out = _block("vae", e, "encoder.", VAE_TOP)
    for i in range(n):
        for j in range(c.layers_per_block):
            out += _block("vae", f"{e}down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.", VAE_RESNET)
        if i < n - 1:
            out += _block(
                "vae", f"{e}down.{i}.downsample.conv.", f"encoder.down_blocks.{i}.downsamplers.0.conv.", WHOLE
            )
    out += _vae_mid(e, "encoder.", VAE_RESNET)
    resnet = VAE_VIDEO_RESNET if c.temporal_decoder else VAE_RESNET
    out += _block("vae", d, "decoder.", VAE_TOP)
    out += _vae_mid(d, "decoder.", resnet)
    for u in range(n):
        level = n - 1 - u
        for j in range(c.layers_per_block + 1):
            out += _block("vae", f"{d}up.{level}.block.{j}.", f"decoder.up_blocks.{u}.resnets.{j}.", resnet)
        if level > 0:
            out += _block("vae", f"{d}up.{level}.upsample.conv.", f"decoder.up_blocks.{u}.upsamplers.0.conv.", WHOLE)
    if c.temporal_decoder:
        out += _block("vae", d, "decoder.", (("conv_out.time_mix_conv.", "time_conv_out."),))
    else:
        out += _block(
            "vae", "first_stage_model.", "", (("quant_conv.", "quant_conv."), ("post_quant_conv.", "post_quant_conv."))
        )
    return out


def clip_entries(c: CLIPVisionConfig) -> list[Entry]:
    p = SGM_PREFIX["image_encoder"]
    out = _block("image_encoder", p, "", CLIP_TOP)
    for i in range(c.num_hidden_layers):
        out += _block(
            "image_encoder", f"{p}transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}.", CLIP_LAYER
        )
    return out


@dataclass(frozen=True)
class KeyTable:
    by_sgm: dict[str, Entry]  # full sgm name or prefix -> entry
    by_ours: dict[str, tuple[Entry, int]]  # "component:our name or prefix" -> (entry, q/k/v part for QKV)


def key_table(config: PipelineConfig) -> KeyTable:
    entries = unet_entries(config.unet) + vae_entries(config.vae) + clip_entries(config.image_encoder)
    by_ours: dict[str, tuple[Entry, int]] = {}
    for e in entries:
        names = [e.ours.format(x) for x in "qkv"] if e.transform == QKV else [e.ours]
        for part, name in enumerate(names):
            by_ours[f"{e.component}:{name}"] = (e, part)
    return KeyTable({e.sgm: e for e in entries}, by_ours)


def lookup(key: str, table: Mapping[str, object]) -> tuple[object, str] | None:
    """The exact entry for `key`, else the longest prefix entry; returns (entry, rest of the key)."""
    if key in table:
        return table[key], ""
    i = len(key)
    while (i := key.rfind(".", 0, i)) != -1:
        if (hit := table.get(key[: i + 1])) is not None:
            return hit, key[i + 1 :]
    return None


def is_unused_sgm_key(key: str) -> bool:
    return key in UNUSED_KEYS or key.startswith(UNUSED_PREFIX)
