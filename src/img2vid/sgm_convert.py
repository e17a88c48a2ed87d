"""sgm single files <-> our component state dicts, through the one key table of `img2vid.sgm_keys`: renaming, the
three reshapes sgm stores differently (1x1-conv attention, open_clip's fused q/k/v and transposed projection), the
temporal VAE's quant_conv, and detecting a file's format and decoder from a few signature keys.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from img2vid.configs import PipelineConfig
from img2vid.errors import CheckpointError
from img2vid.sgm_keys import (
    COMPONENTS,
    COND_AE,
    CONV1X1,
    POSITION_IDS,
    QKV,
    SGM_PREFIX,
    TRANSPOSE,
    Entry,
    few,
    is_unused_sgm_key,
    key_table,
    lookup,
)


# ---- conversion ---------------------------------------------------------------------------------------------------
def _from_sgm(e: Entry, t: torch.Tensor) -> list[torch.Tensor]:
    # Shapes that don't fit a transform pass through untouched, so the strict shape check names them.
    if e.transform == CONV1X1 and t.ndim == 4 and t.shape[2:] == (1, 1):
        return [t.flatten(1)]  # (C, C, 1, 1) -> (C, C)
    if e.transform == TRANSPOSE and t.ndim == 2:
        return [t.t().contiguous()]  # (hidden, proj) -> (proj, hidden)
    if e.transform == QKV and t.shape[0] % 3 == 0:
        return list(t.chunk(3, dim=0))  # (3C, ...) -> 3 x (C, ...), views of the fused tensor: no copy
    return [t]


def _to_sgm(e: Entry, parts: list[torch.Tensor]) -> torch.Tensor:
    t = parts[0]
    if e.transform == CONV1X1 and t.ndim == 2:
        return t[:, :, None, None]  # (C, C) -> (C, C, 1, 1)
    if e.transform == TRANSPOSE and t.ndim == 2:
        return t.t().contiguous()  # (proj, hidden) -> (hidden, proj)
    if e.transform == QKV:
        return torch.cat(parts, dim=0)  # 3 x (C, ...) -> (3C, ...)
    return t


def split_sgm(
    sd: Mapping[str, torch.Tensor], config: PipelineConfig
) -> tuple[dict[str, dict[str, torch.Tensor]], list[str], int]:
    """sgm state dict -> ({component: our state dict}, unknown sgm keys, count of known-unused keys skipped)."""
    table = key_table(config)
    out: dict[str, dict[str, torch.Tensor]] = {c: {} for c in COMPONENTS}
    unknown, skipped = [], 0
    for key, t in sd.items():
        if is_unused_sgm_key(key):
            skipped += 1
            continue
        hit = lookup(key, table.by_sgm)
        if hit is None:
            unknown.append(key)
            continue
        e, rest = hit
        tensors = _from_sgm(e, t)
        names = [e.ours.format(x) for x in "qkv"] if len(tensors) == 3 else [e.ours.replace("{}", "q")]
        for name, tensor in zip(names, tensors, strict=True):
            out[e.component][name + rest] = tensor
    if config.vae.temporal_decoder and "encoder.conv_out.weight" in out["vae"]:
        out["vae"]["quant_conv.weight"], out["vae"]["quant_conv.bias"] = _temporal_quant_conv(sd, out["vae"])
    return out, unknown, skipped


def sgm_to_components(sd: Mapping[str, torch.Tensor], config: PipelineConfig) -> dict[str, dict[str, torch.Tensor]]:
    """Rename (and reshape where sgm differs) an sgm state dict into our three components' state dicts. Known-unused
    tensors are skipped; any other unknown name raises. Missing names and shapes are checked against the models."""
    out, unknown, _ = split_sgm(sd, config)
    if unknown:
        raise CheckpointError(f"{len(unknown)} unknown tensor(s) in the sgm checkpoint: {few(unknown)}")
    return out


def cond_encoder_keys(keys: Iterable[str]) -> list[str]:
    """The conditioning autoencoder's encoder tensors `_temporal_quant_conv` compares (read them too when loading)."""
    return [k for k in keys if k.startswith((COND_AE + "encoder.", COND_AE + "quant_conv."))]


def _temporal_quant_conv(
    sd: Mapping[str, torch.Tensor], vae: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' temporal VAE applies quant_conv after the encoder; sgm's video autoencoder has none. sgm itself
    encodes the conditioning frame with conditioner.embedders.3 (encoder + quant_conv). When that encoder is the very
    same as first_stage_model.encoder, its quant_conv is the one that belongs to it; otherwise (or with no
    embedders.3, e.g. our own files, or meta tensors) the identity reproduces first_stage_model.encode exactly."""
    ref = vae["encoder.conv_out.weight"]
    enc = {k: t for k, t in sd.items() if k.startswith("first_stage_model.encoder.")}
    cond_w, cond_b = sd.get(COND_AE + "quant_conv.weight"), sd.get(COND_AE + "quant_conv.bias")
    if cond_w is not None and cond_b is not None and ref.device.type != "meta":
        same = all(
            (c := sd.get(COND_AE + "encoder." + k[len("first_stage_model.encoder.") :])) is not None
            and c.shape == t.shape
            and torch.equal(c.to(t.device, t.dtype), t)
            for k, t in enc.items()
        )
        if same and cond_w.shape == (ref.shape[0], ref.shape[0], 1, 1):
            return cond_w.to(ref.device, ref.dtype), cond_b.to(ref.device, ref.dtype)
    n = ref.shape[0]  # 2 x latent channels (mean and log-variance)
    eye = torch.eye(n, dtype=ref.dtype, device=ref.device)[:, :, None, None]  # (n, n) -> (n, n, 1, 1)
    return eye, torch.zeros(n, dtype=ref.dtype, device=ref.device)


def _store_quant_conv(sd: dict[str, torch.Tensor], q_w: torch.Tensor, q_b: torch.Tensor) -> None:
    """diffusers' temporal VAE has a quant_conv that sgm's video autoencoder lacks. sgm keeps the pair it belongs to
    in the conditioning autoencoder (conditioner.embedders.3: the same encoder plus a quant_conv), so a learned one is
    written there, next to a copy of the encoder, exactly as Stability's files lay it out; `_temporal_quant_conv`
    takes it back on loading, so the round trip is bit-identical. An identity quant_conv needs no copy."""
    if q_w.device.type == "meta":
        return
    q = q_w.flatten(1)  # (n, n, 1, 1) -> (n, n)
    if torch.equal(q, torch.eye(len(q), dtype=q.dtype, device=q.device)) and not q_b.any():
        return
    prefix = "first_stage_model.encoder."
    for k in [k for k in sd if k.startswith(prefix)]:
        sd[COND_AE + "encoder." + k[len(prefix) :]] = sd[k].clone()  # safetensors stores no shared storage
    sd[COND_AE + "quant_conv.weight"], sd[COND_AE + "quant_conv.bias"] = q_w.clone(), q_b.clone()


def components_to_sgm(sds: Mapping[str, Mapping[str, torch.Tensor]], config: PipelineConfig) -> dict[str, torch.Tensor]:
    """Our component state dicts -> one sgm state dict with the names and shapes of Stability's files (minus the
    known-unused tensors). Unknown names raise."""
    table = key_table(config)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, list] = {}  # sgm name -> [q, k, v] while the three parts come in
    unknown: list[str] = []
    quant: tuple | None = None
    for component, sd in sds.items():
        sd = dict(sd)
        sd.pop(POSITION_IDS, None)
        if component == "vae" and config.vae.temporal_decoder and "quant_conv.weight" in sd:
            quant = (sd.pop("quant_conv.weight"), sd.pop("quant_conv.bias"))
        for name, t in sd.items():
            hit = lookup(f"{component}:{name}", table.by_ours)
            if hit is None:
                unknown.append(f"{component}:{name}")
                continue
            (e, part), rest = hit
            if e.transform == QKV:
                parts = qkv.setdefault(e.sgm, [None, None, None])
                parts[part] = t
                if all(p is not None for p in parts):
                    out[e.sgm] = _to_sgm(e, parts)
            else:
                out[e.sgm + rest] = _to_sgm(e, [t])
    incomplete = [k for k, parts in qkv.items() if k not in out]
    if unknown or incomplete:
        bad = unknown + [f"{k} (q/k/v incomplete)" for k in incomplete]
        raise CheckpointError(f"{len(bad)} tensor(s) with no sgm name: {few(bad)}")
    if quant is not None:
        _store_quant_conv(out, *quant)
    return out


def sgm_names(config: PipelineConfig, component: str, names: Iterable[str]) -> list[str]:
    """Our names -> the sgm names a file would carry them under (for error messages about sgm files)."""
    table = key_table(config)
    out = []
    for name in names:
        hit = lookup(f"{component}:{name}", table.by_ours)
        out.append(hit[0][0].sgm + hit[1] if hit else f"{component}.{name}")
    return out


# ---- detection ---------------------------------------------------------------------------------------------------
def detect_format(keys: Iterable[str]) -> str:
    """From a few signature keys: "sgm", "diffusers-unet", "diffusers-vae", "transformers-clip", "open-clip" or
    "unknown"."""
    ks = set(keys)
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.")) for k in ks):
        return "sgm"
    if "vision_model.embeddings.patch_embedding.weight" in ks:
        return "transformers-clip"
    if "visual.conv1.weight" in ks:
        return "open-clip"
    if "time_embedding.linear_1.weight" in ks and "conv_in.weight" in ks:
        return "diffusers-unet"
    if "encoder.conv_in.weight" in ks and "decoder.conv_in.weight" in ks:
        return "diffusers-vae"
    return "unknown"


def detect_sgm_variant(keys: Iterable[str]) -> str | None:
    """ "temporal" (svd, svd_xt, svd_xt_1_1: video VAE decoder) or "image_decoder" (svd*_image_decoder: 2D decoder);
    None for a file without VAE tensors (a UNet alone), which says nothing of the decoder."""
    ks = set(keys)
    if not any(k.startswith(SGM_PREFIX["vae"]) for k in ks):
        return None
    return "temporal" if "first_stage_model.decoder.mid.block_1.mix_factor" in ks else "image_decoder"
