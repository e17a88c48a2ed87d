"""Checkpoints: the sgm key table against the real SVD-XT key listing, round trips through every layout (tiny random
models, bit-identical), strictness, format detection, pickle refusal, the offline hub and diffusers' own folders."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SHAPES, reference_pipeline

from img2vid import checkpoint as ck
from img2vid import configs
from img2vid.checkpoint_tools import checkpoint_info, convert
from img2vid.configs import PipelineConfig, preset, replace
from img2vid.errors import CheckpointError
from img2vid.folders import weight_variants
from img2vid.sgm_convert import components_to_sgm, detect_format, detect_sgm_variant, sgm_to_components, split_sgm
from img2vid.sgm_keys import COMPONENTS, POSITION_IDS, UNUSED_KEYS, is_unused_sgm_key

# The tensor names and shapes of Stability's svd_xt single-file checkpoints (both decoders), a gzipped copy of the
# team's reference listing, so that the key table is checked on any machine, not only where that folder is.
KEYS_JSON = Path(__file__).parent / "data" / "svd_xt_keys.json.gz"
SHARED_KEYS_JSON = Path("/work/shared/reference/svd_xt_keys.json")  # the original, where this machine has it


def kwargs(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("_")}


def with_decoder(config: PipelineConfig, temporal: bool) -> PipelineConfig:
    return replace(config, vae=replace(config.vae, temporal_decoder=temporal))


def reference_modules(config: PipelineConfig) -> dict[str, torch.nn.Module]:
    """diffusers / transformers modules for a config, built on whatever device is current."""
    from diffusers import AutoencoderKL, AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    vae_cls = AutoencoderKLTemporalDecoder if config.vae.temporal_decoder else AutoencoderKL
    clip = {k: v for k, v in configs.clip_to_transformers(config.image_encoder).items() if k != "architectures"}
    return {
        "unet": UNetSpatioTemporalConditionModel(**kwargs(configs.unet_to_diffusers(config.unet))),
        "vae": vae_cls(**kwargs(configs.vae_to_diffusers(config.vae))),
        "image_encoder": CLIPVisionModelWithProjection(CLIPVisionConfig(**clip)),
    }


def meta_state_dicts(config: PipelineConfig, ours: bool) -> dict[str, dict[str, torch.Tensor]]:
    with torch.device("meta"):
        if ours:
            return {c: ck.model_class(c)(getattr(config, c)).state_dict() for c in COMPONENTS}
        return {c: m.state_dict() for c, m in reference_modules(config).items()}


def shapes(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(t.shape) for k, t in sd.items()}


def random_components(config: PipelineConfig, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Our components with random weights (every tensor distinct, so a swapped mapping cannot go unnoticed). The
    temporal VAE's quant_conv is the identity: sgm's video autoencoder has no quant_conv to store it in (a learned
    one is folded into the encoder: see test_quant_conv_fold)."""
    g = torch.Generator().manual_seed(seed)
    sds = {
        c: {k: torch.randn(t.shape, generator=g) for k, t in sd.items()}
        for c, sd in meta_state_dicts(config, True).items()
    }
    if config.vae.temporal_decoder:
        n = sds["vae"]["quant_conv.bias"].shape[0]
        sds["vae"]["quant_conv.weight"] = torch.eye(n)[:, :, None, None]
        sds["vae"]["quant_conv.bias"] = torch.zeros(n)
    return sds


def assert_same(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> None:
    assert set(a) == set(b)
    for c in a:
        assert set(a[c]) == set(b[c]), (c, sorted(set(a[c]) ^ set(b[c]))[:5])
        for k in a[c]:
            assert a[c][k].dtype == b[c][k].dtype and torch.equal(a[c][k], b[c][k]), (c, k)


TINY = preset("tiny")
TINY_B = PipelineConfig(name="tiny-b", unet=SHAPES["b"][0], vae=SHAPES["b"][1], image_encoder=SHAPES["b"][2])


# ---- (1) the key table against the real svd_xt key listing --------------------------------------------------------
@pytest.fixture(scope="module")
def real_keys() -> dict:
    return json.loads(gzip.decompress(KEYS_JSON.read_bytes()))


@pytest.mark.skipif(not SHARED_KEYS_JSON.exists(), reason="the reference folder is not on this machine")
def test_vendored_key_listing_is_the_reference(real_keys):
    assert real_keys == json.loads(SHARED_KEYS_JSON.read_text())


@pytest.mark.parametrize("ours", [True, False], ids=["ours", "reference"])
@pytest.mark.parametrize("variant", ["svd_xt", "svd_xt_image_decoder"])
def test_table_matches_real_svd_xt_keys(real_keys, variant, ours):
    config = with_decoder(preset("svd-xt"), variant == "svd_xt")
    sds = meta_state_dicts(config, ours)
    real = {k: tuple(v[0]) for k, v in real_keys[variant]["tensors"].items()}
    used = {k: s for k, s in real.items() if not is_unused_sgm_key(k)}
    assert len(real) == real_keys[variant]["tensor_count"] and len(real) - len(used) == 6 + 248  # text + embedders.3
    # ours -> sgm: exactly the real names and shapes, minus the known-unused ones
    assert shapes(components_to_sgm(sds, config)) == used
    # sgm -> ours: the full real key set (unused ones included) gives exactly the models' names and shapes
    back = sgm_to_components({k: torch.empty(s, device="meta") for k, s in real.items()}, config)
    for c in COMPONENTS:
        assert shapes(back[c]) == shapes(sds[c]), c
    params = {c: sum(t.numel() for t in sd.values()) for c, sd in back.items()}
    assert params["unet"] == 1_524_623_082 and params["image_encoder"] == 632_076_800  # SVD.md
    if variant == "svd_xt":
        assert params["vae"] == 34_163_592 + 63_579_183 + 72  # encoder + temporal decoder + quant_conv (8x8+8)
    assert detect_sgm_variant(real) == ("temporal" if variant == "svd_xt" else "image_decoder")


# ---- (2) round trips, tiny random models ----------------------------------------------------------------------------
@pytest.mark.parametrize("config", [TINY, TINY_B, with_decoder(TINY, False)], ids=["a", "b", "image-decoder"])
def test_sgm_round_trip_is_bit_identical(config):
    sds = random_components(config)
    sgm = components_to_sgm(sds, config)
    assert detect_format(sgm) == "sgm"
    assert_same(sgm_to_components(sgm, config), sds)


def test_single_file_round_trip(tmp_path):
    sds = random_components(TINY_B, seed=1)
    path = ck.save_single_file(tmp_path / "tiny.safetensors", TINY_B, sds)
    config, back = ck.load_single_file(path)  # config from the file's metadata
    assert config == TINY_B
    assert_same(back, sds)
    config16, back16 = ck.load_single_file(path, dtype=torch.float16)
    assert_same(back16, {c: {k: t.half() for k, t in sd.items()} for c, sd in sds.items()})
    assert ck.detect_config(path) == TINY_B
    info = checkpoint_info(path)
    assert (
        info["format"] == "sgm" and info["variant"] == "temporal" and info["ok"] and info["config_source"] == "metadata"
    )
    assert info["components"]["unet"]["params"] == sum(t.numel() for t in sds["unet"].values())


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_folder_round_trip(tmp_path, variant):
    sds = random_components(TINY, seed=2)
    folder = ck.save_folder(tmp_path / "tiny", TINY, sds, variant=variant)
    assert ck.read_pipeline_config(folder) == TINY
    dtype = torch.float16 if variant else torch.float32
    back = {c: ck.load_component(folder, c, variant) for c in COMPONENTS}
    assert_same(back, {c: {k: t.to(dtype) for k, t in sd.items()} for c, sd in sds.items()})
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    v = f".{variant}" if variant else ""
    assert f"unet/diffusion_pytorch_model{v}.safetensors" in names and f"image_encoder/model{v}.safetensors" in names
    assert not [n for n in names if ".tmp" in n]  # atomic writes left nothing behind


def test_convert_folder_file_folder(tmp_path):
    config = with_decoder(TINY_B, False)
    sds = random_components(config, seed=3)
    folder = ck.save_folder(tmp_path / "a", config, sds)
    single = convert(folder, tmp_path / "b.safetensors")
    again = convert(single, tmp_path / "c")
    assert ck.read_pipeline_config(again) == config
    assert_same({c: ck.load_component(again, c) for c in COMPONENTS}, sds)
    half = convert(single, tmp_path / "d", variant="fp16")
    assert ck.load_component(half, "unet", "fp16")["conv_in.weight"].dtype == torch.float16


def test_single_files_are_byte_identical_however_often_written(tmp_path):
    """safetensors writes its metadata from a hash map, in an order that changes from one write to the next: the same
    model gave files with different bytes (and checksums). Ours sort it, so file -> folder -> file is byte-exact."""
    sds = random_components(TINY, seed=8)
    first = ck.save_single_file(tmp_path / "a.safetensors", TINY, sds).read_bytes()
    for i in range(8):  # unsorted, two metadata entries come out in either order: 8 agreeing writes by chance, 1/256
        assert ck.save_single_file(tmp_path / f"b{i}.safetensors", TINY, sds).read_bytes() == first
    again = convert(convert(tmp_path / "a.safetensors", tmp_path / "f"), tmp_path / "c.safetensors")
    assert again.read_bytes() == first


def test_written_weights_get_the_umask_mode_and_io_errors_are_oserrors(tmp_path, monkeypatch):
    """safetensors writes through a private temporary file (0600): our files get what the umask gives any new file,
    as the JSON files beside them do. Its I/O failures (a full disk) are not OSErrors: they become ones, which the
    CLI reports in a line like any other unwritable path."""
    import safetensors.torch
    from safetensors import SafetensorError

    old = os.umask(0o022)
    try:
        folder = ck.save_folder(tmp_path / "f", TINY, random_components(TINY))
        single = ck.save_single_file(tmp_path / "a.safetensors", TINY, random_components(TINY))
    finally:
        os.umask(old)
    for path in (single, folder / "unet" / "diffusion_pytorch_model.safetensors", folder / "model_index.json"):
        assert path.stat().st_mode & 0o777 == 0o644, path

    def full_disk(*args: object, **kwargs: object) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match=r"cannot write .*b\.safetensors: .*No space left on device"):
        ck.save_single_file(tmp_path / "b.safetensors", TINY, random_components(TINY))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "f"]  # no temporary file left


def test_saving_over_a_folder_is_never_taken_for_complete_half_way(tmp_path, monkeypatch):
    """model_index.json is written last and required by the loader; saving over an existing folder removes the old
    one first, so an interrupted save does not load as a mix of two models' weights."""
    old, new = random_components(TINY, seed=9), random_components(TINY, seed=10)
    folder = ck.save_folder(tmp_path / "f", TINY, old)
    writes = []

    def failing_write(path: Path, *args: object) -> None:
        writes.append(path)
        if len(writes) == 2:
            raise OSError("disk full")

    monkeypatch.setattr(ck, "write_safetensors", failing_write)
    with pytest.raises(OSError, match="disk full"):
        ck.save_folder(folder, TINY, new)
    with pytest.raises(CheckpointError, match="model_index.json is missing"):
        ck.read_pipeline_config(folder)


def test_convert_onto_an_existing_path_of_the_other_kind(tmp_path):
    single = ck.save_single_file(tmp_path / "a.safetensors", TINY, random_components(TINY))
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(CheckpointError, match=r"file already exists as a file"):
        convert(single, tmp_path / "file")
    with pytest.raises(CheckpointError, match=r"dir\.safetensors already exists as a folder"):
        convert(single, tmp_path / "dir.safetensors")
    assert convert(single, single, dtype=torch.float16) == single  # in place (atomically) is fine
    assert ck.load_single_file(single)[1]["unet"]["conv_in.weight"].dtype == torch.float16


def test_convert_replaces_a_model_folder_whole_and_reads_a_variant_only_folder(tmp_path):
    """Converting onto another model's folder replaces its model entries whole (its plain weights stayed beside the
    new fp16 ones and were the ones loaded); onto its own source folder, the new variant goes beside the old files.
    A folder of one variant alone converts without --variant (as it loads), a leftover of an interrupted save can be
    written over, --variant between two files is refused, the destination's suffix is read in any case, and a file in
    the way of the destination's folders is named."""
    old, new = random_components(TINY, seed=11), random_components(TINY, seed=12)
    stale = ck.save_folder(tmp_path / "stale", TINY, old)
    single = ck.save_single_file(tmp_path / "new.safetensors", TINY, new)
    convert(single, stale, variant="fp16")
    assert sorted(p.name for p in (stale / "unet").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.fp16.safetensors",
    ]
    loaded = ck.load_component(stale, "unet", "fp16")
    assert torch.equal(loaded["conv_in.weight"], new["unet"]["conv_in.weight"].half())
    hidden = [p for d in (tmp_path, stale) for p in d.iterdir() if p.name.startswith(".")]
    assert not hidden  # no staged or old folder left
    # a folder of fp16 files alone: read in fp16 without --variant, to a folder and to a file; "none": plain only
    plain = convert(stale, tmp_path / "plain")
    assert ck.load_component(plain, "unet")["conv_in.weight"].dtype == torch.float16
    assert convert(stale, tmp_path / "f16.safetensors").is_file()
    with pytest.raises(CheckpointError, match="only the fp16 variant"):
        convert(stale, tmp_path / "p.safetensors", variant="none")
    # its own folder: the plain files join the fp16 ones (the same model)
    convert(stale, stale, dtype=torch.float32)
    assert weight_variants(stale, "unet") == (True, ["fp16"])
    # what an interrupted save over a model folder leaves (no model_index.json) is a model folder to write over
    (plain / "model_index.json").unlink()
    assert convert(single, plain) == plain and ck.read_pipeline_config(plain) == TINY
    # what else a model folder holds stays: a README, a .git, the very file converted from (the hub's SVD layout)
    (plain / "README.md").write_text("notes")
    (plain / ".git").mkdir()
    inside = ck.save_single_file(plain / "svd.safetensors", TINY, old)
    convert(inside, plain)
    assert {"README.md", ".git", "svd.safetensors", "model_index.json"} <= {p.name for p in plain.iterdir()}
    assert torch.equal(ck.load_component(plain, "unet")["conv_in.weight"], old["unet"]["conv_in.weight"])
    with pytest.raises(CheckpointError, match="lies inside .* model files, which converting there replaces"):
        convert(plain / "unet" / "diffusion_pytorch_model.safetensors", plain)
    # ".", and a symlink to a model folder: the folder itself (the link stays a link)
    link = tmp_path / "link"
    link.symlink_to(plain)
    assert convert(single, link) == plain and link.is_symlink()
    cwd = os.getcwd()
    os.chdir(plain)
    try:
        assert convert(single, Path(".")) == plain
    finally:
        os.chdir(cwd)
    with pytest.raises(CheckpointError, match="--variant fp16 names a folder's files; .* are single files"):
        convert(single, tmp_path / "x.safetensors", variant="fp16")
    upper = convert(stale, tmp_path / "UP.SAFETENSORS")
    assert upper.is_file()
    with pytest.raises(CheckpointError, match="we write .safetensors files or folders only"):
        convert(single, tmp_path / "out.CKPT")
    (tmp_path / "in_the_way").write_text("a file")
    with pytest.raises(CheckpointError, match="in_the_way is a file, not a folder"):
        convert(single, tmp_path / "in_the_way" / "deeper" / "m.safetensors")


def test_converting_a_folder_onto_itself_never_breaks_its_other_variant(tmp_path, monkeypatch):
    """Adding a variant to a folder in place, interrupted: its plain weights still load (model_index.json was
    removed first, so the untouched folder no longer loaded)."""
    sds = random_components(TINY, seed=13)
    folder = ck.save_folder(tmp_path / "m", TINY, sds)
    writes = []
    real = ck.write_safetensors

    def failing_write(path: Path, *args: object) -> None:
        writes.append(path)
        if len(writes) == 2:
            raise OSError("disk full")
        real(path, *args)

    monkeypatch.setattr(ck, "write_safetensors", failing_write)
    with pytest.raises(OSError, match="disk full"):
        convert(folder, folder, variant="fp16")
    monkeypatch.undo()
    assert torch.equal(ck.load_component(folder, "unet")["conv_in.weight"], sds["unet"]["conv_in.weight"])
    assert ck.read_pipeline_config(folder) == TINY and weight_variants(folder, "unet") == (True, [])
    assert not [p for d in (tmp_path, folder) for p in d.iterdir() if p.name.startswith(".")]


def test_learned_quant_conv_round_trips_through_the_conditioning_autoencoder(tmp_path):
    """The temporal VAE's quant_conv has no place in sgm's video autoencoder: a learned one is written with a copy of
    the encoder as sgm's conditioning autoencoder (embedders.3), and comes back bit-identical, through a file too."""
    pipe = reference_pipeline("a", seed=5)  # diffusers tiny VAE with a perturbed (non-identity) quant_conv
    sds = {c: getattr(pipe, c).state_dict() for c in COMPONENTS}
    sgm = components_to_sgm(sds, TINY)
    assert "conditioner.embedders.3.encoder.quant_conv.weight" in sgm
    assert torch.equal(
        sgm["conditioner.embedders.3.encoder.encoder.conv_in.weight"], sds["vae"]["encoder.conv_in.weight"]
    )
    back = sgm_to_components(sgm, TINY)
    for c in COMPONENTS:
        want = {k: v for k, v in sds[c].items() if k != POSITION_IDS}
        assert set(back[c]) == set(want) and all(torch.equal(back[c][k], want[k]) for k in want), c
    path = ck.save_single_file(tmp_path / "svd_tiny.safetensors", TINY, sds)
    _, loaded = ck.load_single_file(path, config=TINY)
    assert torch.equal(loaded["vae"]["quant_conv.weight"], sds["vae"]["quant_conv.weight"])


def conditioning_encoder_copy(sgm: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """sgm's conditioning autoencoder (embedders.3) holding the very same encoder as first_stage_model, as
    Stability's files do: its tensors, cloned, under the embedders.3 names (no quant_conv)."""
    return {
        "conditioner.embedders.3.encoder.encoder." + k.removeprefix("first_stage_model.encoder."): t.clone()
        for k, t in sgm.items()
        if k.startswith("first_stage_model.encoder.")
    }


def test_quant_conv_from_conditioning_autoencoder():
    """When sgm's conditioning autoencoder (embedders.3) has the very same encoder, its quant_conv is the one."""
    sds = random_components(TINY, seed=6)
    sgm = components_to_sgm(sds, TINY)
    cond = conditioning_encoder_copy(sgm)
    q_w, q_b = torch.randn(8, 8, 1, 1), torch.randn(8)
    cond |= {
        "conditioner.embedders.3.encoder.quant_conv.weight": q_w,
        "conditioner.embedders.3.encoder.quant_conv.bias": q_b,
    }
    back = sgm_to_components(sgm | cond, TINY)["vae"]
    assert torch.equal(back["quant_conv.weight"], q_w) and torch.equal(back["quant_conv.bias"], q_b)
    cond["conditioner.embedders.3.encoder.encoder.conv_in.bias"] += 1  # a different encoder: no quant_conv of its own
    assert torch.equal(sgm_to_components(sgm | cond, TINY)["vae"]["quant_conv.weight"].flatten(1), torch.eye(8))


def test_config_dict_round_trip():
    for name in configs.PRESETS:
        c = preset(name)
        assert ck.config_from_dict(json.loads(json.dumps(ck.config_to_dict(c)))) == c
    with pytest.raises(CheckpointError, match="unknown fields"):
        ck.config_from_dict({**ck.config_to_dict(TINY), "bogus": 1})


def test_peek_config_reads_only_our_metadata(tmp_path):
    ours = ck.save_single_file(tmp_path / "ours.safetensors", TINY_B, random_components(TINY_B))
    assert ck.peek_config(ours) == TINY_B
    theirs = tmp_path / "svd_tiny.safetensors"  # Stability's files carry no config of ours
    ck.write_safetensors(theirs, components_to_sgm(random_components(TINY), TINY), {})
    assert ck.peek_config(theirs) is None
    assert ck.peek_config(tmp_path / "model.ckpt") is None  # not safetensors: no header to peek at, never unpickled
    broken = tmp_path / "broken.safetensors"
    ck.write_safetensors(broken, {"x": torch.zeros(1)}, {ck.CONFIG_KEY: "{not json"})
    with pytest.raises(CheckpointError, match="unreadable img2vid_config metadata"):
        ck.peek_config(broken)


# ---- (3) strictness -------------------------------------------------------------------------------------------------
def test_load_into_names_missing_unexpected_and_wrong_shapes():
    sds = random_components(TINY)
    cases = {
        "missing": ({k: t for k, t in sds["unet"].items() if k != "conv_in.bias"}, "conv_in.bias"),
        "unexpected": ({**sds["unet"], "bogus.weight": torch.zeros(1)}, "bogus.weight"),
        "wrong shape": ({**sds["unet"], "conv_out.bias": torch.zeros(5)}, "conv_out.bias (5,) vs (4,)"),
    }
    for what, (sd, name) in cases.items():
        with torch.device("meta"):
            module = reference_modules(TINY)["unet"]
        with pytest.raises(CheckpointError) as e:
            ck.load_into(module, sd, "unet")
        msg = str(e.value)
        assert "\n" not in msg and what in msg and name in msg, msg
    unet = ck.build(ck.model_class("unet"), TINY.unet, sds["unet"], "unet")
    assert torch.equal(unet.state_dict()["conv_in.weight"], sds["unet"]["conv_in.weight"])


def test_position_ids_dropped(tmp_path):
    sds = random_components(TINY)
    enc = {**sds["image_encoder"], POSITION_IDS: torch.arange(257)[None]}
    with torch.device("meta"):
        module = reference_modules(TINY)["image_encoder"]
    ck.load_into(module, enc, "image_encoder")  # no error: the buffer is dropped
    folder = ck.save_folder(tmp_path / "f", TINY, sds)
    ck.write_safetensors(folder / "image_encoder" / "model.safetensors", enc, {})
    assert POSITION_IDS not in ck.load_component(folder, "image_encoder")
    assert POSITION_IDS not in components_to_sgm({"image_encoder": enc}, TINY).keys()


def test_sgm_strictness(tmp_path):
    sds = random_components(TINY)
    sgm = components_to_sgm(sds, TINY)
    unused = {k: torch.zeros(2) for k in UNUSED_KEYS} | {
        "conditioner.embedders.3.encoder.decoder.conv_in.bias": torch.zeros(2)
    }
    assert_same(sgm_to_components(sgm | unused, TINY), sds)  # known-unused: skipped silently
    with pytest.raises(CheckpointError, match=r"unknown tensor.*model\.diffusion_model\.bogus\.weight"):
        sgm_to_components({**sgm, "model.diffusion_model.bogus.weight": torch.zeros(1)}, TINY)

    def save(sd: dict) -> Path:
        path = tmp_path / "svd_xt.safetensors"
        ck.write_safetensors(path, sd, {ck.CONFIG_KEY: json.dumps(ck.config_to_dict(TINY))})
        return path

    missing = "model.diffusion_model.input_blocks.1.0.in_layers.0.weight"
    with pytest.raises(CheckpointError, match=rf"1 missing \({missing}\)"):
        ck.load_single_file(save({k: t for k, t in sgm.items() if k != missing}))
    wrong = "first_stage_model.decoder.conv_out.time_mix_conv.bias"
    with pytest.raises(CheckpointError, match=rf"wrong shape .*{wrong} \(5,\) vs \(3,\)"):
        ck.load_single_file(save({**sgm, wrong: torch.zeros(5)}))
    with pytest.raises(CheckpointError, match="unknown tensor.*first_stage_model.bogus"):
        ck.load_single_file(save({**sgm, "first_stage_model.bogus": torch.zeros(5)}))
    info = checkpoint_info(save({**sgm, wrong: torch.zeros(5)}))
    assert not info["ok"] and info["components"]["vae"]["wrong_shape"] == ["decoder.time_conv_out.bias"]
    # An explicit config takes the file's kind of VAE decoder; a stored one must agree with it.
    assert ck.load_single_file(save(sgm), config=with_decoder(TINY, False))[0].vae.temporal_decoder
    path = tmp_path / "bad.safetensors"
    ck.write_safetensors(path, sgm, {ck.CONFIG_KEY: json.dumps(ck.config_to_dict(with_decoder(TINY, False)))})
    with pytest.raises(CheckpointError, match="disagree"):
        ck.load_single_file(path)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_weights_are_named(tmp_path, dtype):
    """No dtype cast touches an integer or bool tensor: it reached torch's load_state_dict, whose error is a
    multi-line RuntimeError, and `info` called the file usable."""
    sds = random_components(TINY)
    sds["unet"]["conv_in.weight"] = sds["unet"]["conv_in.weight"].to(dtype)
    path = ck.save_single_file(tmp_path / "x.safetensors", TINY, sds)
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(
        CheckpointError,
        match=rf"not floating-point \(model\.diffusion_model\.input_blocks\.0\.0\.weight torch\.{name}\)",
    ):
        ck.load_single_file(path, dtype=torch.float32)
    info = checkpoint_info(path)
    assert not info["ok"] and info["components"]["unet"]["wrong_dtype"] == ["conv_in.weight"]
    folder = ck.save_folder(tmp_path / "f", TINY, sds)
    with pytest.raises(CheckpointError, match=rf"unet weights .* not floating-point \(conv_in\.weight torch\.{name}\)"):
        ck.build(ck.model_class("unet"), TINY.unet, ck.load_component(folder, "unet", dtype=torch.float32), "unet")


@pytest.mark.parametrize(
    "rel, change, message",
    [
        (
            "unet/config.json",
            {"layers_per_block": "2"},
            r"unet\.layers_per_block must be a list of ints >= 1, not \('2', '2'\)",
        ),
        ("unet/config.json", {"block_out_channels": 32}, r"'int' object is not iterable"),
        ("unet/config.json", {"num_frames": 0}, r"unet\.num_frames must be an int >= 1"),
        ("vae/config.json", {"scaling_factor": "0.18215"}, r"vae\.scaling_factor must be a finite number"),
        ("feature_extractor/preprocessor_config.json", {"image_mean": [0.5, 0.5]}, r"image_mean must be a list of 3"),
        ("model_index.json", {"_img2vid": {"default_fps": "7"}}, r"default_fps must be an int >= 1, not '7'"),
        ("model_index.json", {"_img2vid": [1]}, r"_img2vid is not an object"),
    ],
    ids=["layers-str", "channels-int", "frames-0", "scaling-str", "mean-of-2", "fps-str", "img2vid-list"],
)
def test_config_values_of_the_wrong_type_are_named(tmp_path, rel, change, message):
    """Values of the wrong type in a folder's JSON files: some failed deep inside a model's constructor (TypeError,
    ZeroDivisionError), others loaded and broke the first generation (a string scaling_factor)."""
    folder = ck.save_folder(tmp_path / "f", TINY, random_components(TINY))
    data = json.loads((folder / rel).read_text())
    (folder / rel).write_text(json.dumps({**data, **change}))
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(folder.resolve()))}: .*{message}"):
        ck.read_pipeline_config(folder)


def test_stored_config_of_the_wrong_type_is_named(tmp_path):
    bad = {**ck.config_to_dict(TINY), "default_fps": "7"}
    path = tmp_path / "x.safetensors"
    ck.write_safetensors(path, components_to_sgm(random_components(TINY), TINY), {ck.CONFIG_KEY: json.dumps(bad)})
    with pytest.raises(CheckpointError, match="unreadable img2vid_config metadata .*default_fps must be an int"):
        ck.load_single_file(path)


def test_malformed_shard_index_is_named(tmp_path):
    folder = ck.save_folder(tmp_path / "f", TINY, random_components(TINY))
    index = folder / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    for text in ['{"weight_map": ["a"]}', '{"weight_map": {"conv_in.weight": 5}}', "{}"]:
        index.write_text(text)
        with pytest.raises(CheckpointError, match="no weight_map of tensor names to shard file names"):
            ck.load_component(folder, "unet")
    index.write_text("[]")
    with pytest.raises(CheckpointError, match="expected a JSON object"):
        ck.load_component(folder, "unet")


def test_folder_weight_errors_name_the_folder(tmp_path):
    """A wrong tensor in a folder is reported with the folder's path (a user may hold several), and before any model
    is built."""
    from img2vid import Pipeline

    sds = random_components(TINY)
    sds["vae"]["decoder.conv_out.weight"] = sds["vae"]["decoder.conv_out.weight"][:1]
    folder = ck.save_folder(tmp_path / "f", TINY, sds)
    message = rf"^{re.escape(str(folder))}: vae weights do not match the model config: 1 wrong shape .*conv_out"
    with pytest.raises(CheckpointError, match=message):
        ck.load_folder(folder)
    with pytest.raises(CheckpointError, match=message):
        Pipeline.from_pretrained(folder)


def test_variant_is_a_name_not_a_path(tmp_path):
    folder = ck.save_folder(tmp_path / "f", TINY, random_components(TINY))
    for bad in ("../../elsewhere", "fp16/x", ""):
        with pytest.raises(CheckpointError, match="is not a variant name"):
            ck.save_folder(tmp_path / "g", TINY, random_components(TINY), variant=bad)
        with pytest.raises(CheckpointError, match="is not a variant name"):
            ck.load_component(folder, "unet", bad)
    assert not (tmp_path / "g").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_missing_variant_is_named(tmp_path):
    folder = ck.save_folder(tmp_path / "f", TINY, random_components(TINY))
    with pytest.raises(CheckpointError, match=r"unet/diffusion_pytorch_model\.fp16\.safetensors not found.*'fp16'"):
        ck.load_component(folder, "unet", "fp16")
    (folder / "vae" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"vae/config\.json is missing"):
        ck.read_pipeline_config(folder)
    # The other way round: a folder holding only a variant (a hub download of the fp16 files) says so.
    half = ck.save_folder(tmp_path / "h", TINY, random_components(TINY), variant="fp16")
    with pytest.raises(CheckpointError, match=r"model\.safetensors not found: this folder has only the fp16 variant"):
        ck.load_component(half, "image_encoder")


@pytest.mark.parametrize(
    "names, expected",
    [
        (["diffusion_pytorch_model.safetensors"], (True, [])),
        (["diffusion_pytorch_model.fp16.safetensors"], (False, ["fp16"])),
        (["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"], (True, ["fp16"])),
        (["diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model.safetensors.index.json"],
         (True, [])),
        (["diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
          "diffusion_pytorch_model.safetensors.index.fp16.json"], (False, ["fp16"])),  # diffusers' variant shards
        (["diffusion_pytorch_model.fp16.safetensors.index.json"], (False, ["fp16"])),  # transformers' index name
        (["diffusion_pytorch_model.bin", "diffusion_pytorch_model.ema.safetensors"], (True, ["ema"])),
        (["config.json", "diffusion_pytorch_model_notes.txt", "other.fp16.safetensors"], (False, [])),
    ],
    ids=["plain", "variant", "both", "plain-shards", "variant-shards", "variant-index", "pickle", "unrelated"],
)  # fmt: skip
def test_weight_variants_reads_every_naming(tmp_path, names, expected):
    """One listing of a component's weights, used by the CLI (a folder of one variant needs no --variant), by
    `info` and by the missing-file error."""
    (tmp_path / "unet").mkdir()
    for name in names:
        (tmp_path / "unet" / name).write_bytes(b"")
    assert weight_variants(tmp_path, "unet") == expected


def test_only_variant_and_info_use_the_one_listing(tmp_path):
    from img2vid.folders import only_variant

    half = ck.save_folder(tmp_path / "h", TINY, random_components(TINY), variant="fp16")
    assert only_variant(half) == "fp16"
    info = checkpoint_info(half)
    assert (info["variant"], info["variants"]) == ("fp16", ["fp16"])
    # A plain model in shards beside an fp16 variant: the plain one is what loads without a variant.
    # Plain pickles beside it: they load only when allowed, else the fp16 safetensors are what the folder offers
    (half / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"")
    assert only_variant(half) == "fp16" and only_variant(half, allow_pickle=True) is None
    (half / "unet" / "diffusion_pytorch_model-00001-of-00001.safetensors").write_bytes(b"")
    assert only_variant(half) is None


def test_info_reads_a_folder_of_two_variants_as_loading_does(tmp_path):
    """A folder of fp16 and bf16 weights and no plain ones: without --variant, loading finds nothing to read (which
    variant is not guessed), and info says the same instead of describing the first variant it listed."""
    two = ck.save_folder(tmp_path / "two", TINY, random_components(TINY), variant="fp16")
    ck.save_folder(two, TINY, random_components(TINY), variant="bf16")
    with pytest.raises(CheckpointError) as loading:
        ck.load_folder(two)
    with pytest.raises(CheckpointError) as described:
        checkpoint_info(two)
    assert str(described.value) == str(loading.value)
    assert checkpoint_info(two, "bf16")["variant"] == "bf16" and checkpoint_info(two, "fp16")["ok"]


# ---- (4) detection --------------------------------------------------------------------------------------------------
def test_detect_formats(real_keys):
    sds = meta_state_dicts(TINY, ours=False)
    assert detect_format(real_keys["svd_xt"]["tensors"]) == "sgm"
    assert detect_format(sds["unet"]) == "diffusers-unet"
    assert detect_format(sds["vae"]) == "diffusers-vae"
    assert detect_format(meta_state_dicts(with_decoder(TINY, False), ours=False)["vae"]) == "diffusers-vae"
    assert detect_format(sds["image_encoder"]) == "transformers-clip"
    assert detect_format(["visual.conv1.weight", "visual.proj", "token_embedding.weight"]) == "open-clip"
    assert detect_format(["foo.weight"]) == "unknown"
    assert detect_sgm_variant(real_keys["svd_xt_image_decoder"]["tensors"]) == "image_decoder"


def test_preset_from_file_name(tmp_path):
    names = {"svd_xt_1_1": "svd-xt-1.1", "svd_xt": "svd-xt", "svd": "svd", "model": None}
    names |= {"stable-video-diffusion-img2vid-xt-1-1": "svd-xt-1.1", "svd_xt_image_decoder": "svd-xt"}
    for name, want in names.items():
        assert ck.preset_from_name(name) == want, name
    # With no config stored, a single file gets the preset its name says and the VAE decoder its keys say.
    for name, want, temporal in [("svd_image_decoder", "svd", False), ("svd_xt_1_1", "svd-xt-1.1", True)]:
        config = with_decoder(TINY, temporal)
        path = tmp_path / f"{name}.safetensors"
        ck.write_safetensors(path, components_to_sgm(random_components(config), config), {})
        got = ck.detect_config(path)
        assert got.name == want and got.vae.temporal_decoder == temporal and got.unet == preset(want).unet


# ---- (5) pickles ----------------------------------------------------------------------------------------------------
def test_pickles_refused_unless_allowed(tmp_path):
    sds = random_components(TINY)
    sgm = components_to_sgm(sds, TINY)
    path = tmp_path / "svd.ckpt"
    torch.save({"state_dict": sgm, "global_step": 3}, path)
    with pytest.raises(CheckpointError, match="pickle file that can run code.*allow_pickle=True"):
        ck.load_single_file(path, config=TINY)
    config, back = ck.load_single_file(path, config=TINY, allow_pickle=True)
    assert_same(back, sds)
    folder = ck.save_folder(tmp_path / "f", TINY, sds)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(sds["unet"], folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        ck.load_component(folder, "unet")
    assert_same({"unet": ck.load_component(folder, "unet", allow_pickle=True)}, {"unet": sds["unet"]})


# ---- (6) the hub, and folders written by diffusers itself ----------------------------------------------------------
def test_offline_hub_id_with_empty_cache(tmp_path):
    # huggingface_hub reads HF_HUB_OFFLINE / HF_HOME at import, so this runs in a fresh interpreter.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    code = (
        "from img2vid.checkpoint import resolve_pretrained\n"
        "try:\n    resolve_pretrained('stabilityai/stable-video-diffusion-img2vid-xt')\n"
        "except Exception as e:\n    print(type(e).__name__, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    assert out.startswith("CheckpointError") and "not in the local Hugging Face cache" in out and "local" in out, out
    with pytest.raises(CheckpointError, match="no such folder"):
        ck.resolve_pretrained(str(tmp_path / "nowhere"))
    # Paths that pass for hub ids: a mistyped file, and names the hub's rules refuse (before any network access).
    with pytest.raises(CheckpointError, match=r"^models/svd_xt\.safetensors: no such checkpoint file$"):
        ck.resolve_pretrained("models/svd_xt.safetensors")
    for bad in ("a--b/model", "owner/model.git", "owner/-model"):
        with pytest.raises(CheckpointError, match=rf"^{bad}: no such folder, and not a valid hub id \("):
            ck.resolve_pretrained(bad)
    assert ck.resolve_pretrained(str(tmp_path)) == tmp_path


def test_diffusers_save_pretrained_folder_loads(tiny_model_dir, reference_pipelines):
    pipe = reference_pipelines["a"]
    config = ck.read_pipeline_config(tiny_model_dir)
    assert (config.unet, config.vae, config.image_encoder) == (TINY.unet, TINY.vae, TINY.image_encoder)
    assert config.scheduler == configs.SchedulerConfig()
    ref = {c: getattr(pipe, c).state_dict() for c in COMPONENTS}
    assert_same({c: ck.load_component(tiny_model_dir, c) for c in COMPONENTS}, ref)
    half = {c: ck.load_component(tiny_model_dir, c, "fp16") for c in COMPONENTS}
    assert_same(half, {c: {k: t.half() for k, t in sd.items()} for c, sd in ref.items()})
    info = checkpoint_info(tiny_model_dir)
    assert info["format"] == "diffusers-folder" and info["variants"] == ["fp16"] and info["ok"]


def test_sharded_component_saved_by_diffusers(tmp_path):
    pipe = reference_pipeline("a", seed=4)
    for variant in (None, "fp16"):
        pipe.unet.save_pretrained(tmp_path / "unet", max_shard_size="300KB", variant=variant)
        assert len(list((tmp_path / "unet").glob("*.index*.json"))) == (1 if variant is None else 2)
        assert_same({"unet": ck.load_component(tmp_path, "unet", variant)}, {"unet": pipe.unet.state_dict()})


def test_our_folder_loads_in_diffusers(tmp_path):
    from diffusers import StableVideoDiffusionPipeline

    sds = random_components(TINY, seed=7)
    folder = ck.save_folder(tmp_path / "ours", TINY, sds)
    pipe = StableVideoDiffusionPipeline.from_pretrained(folder)
    assert_same({c: getattr(pipe, c).state_dict() for c in COMPONENTS}, sds)
    assert list(pipe.feature_extractor.image_mean) == list(TINY.image_encoder.image_mean)
    assert pipe.scheduler.config.sigma_max == 700.0 and pipe.scheduler.config.use_karras_sigmas


def test_whole_file_reader_places_every_tensor_aligned(tmp_path, monkeypatch):
    """The GPU loading path (whole file, several readers, pinned chunks) on the CPU with tiny chunks: every tensor
    comes back equal to safetensors' own reading, at a 256-byte aligned offset of one buffer, however the file
    packed it (odd sizes, empty tensors, tensors spanning chunks and readers); a tensor that needs a cast sends
    the caller back to the per-tensor reader."""
    from safetensors.torch import save_file

    import img2vid.checkpoint_io as cio

    monkeypatch.setattr(cio, "_STAGE", 1000)
    g = torch.Generator().manual_seed(0)
    sd = {f"t{i}": torch.randn(int(torch.randint(0, 300, (1,), generator=g)), generator=g).half() for i in range(50)}
    sd |= {"odd": torch.ones(3, dtype=torch.float16), "flag": torch.tensor([True, False]), "ids": torch.arange(7)}
    sd["empty"] = torch.zeros(0, 4, dtype=torch.float16)
    path = tmp_path / "x.safetensors"
    save_file(sd, str(path))
    out = cio._read_whole_file(path, torch.device("cpu"), torch.float16)
    assert out is not None and out.keys() == sd.keys()
    for k, v in sd.items():
        assert out[k].dtype == v.dtype and torch.equal(out[k], v), k
    base = min(t.data_ptr() for t in out.values() if t.numel())
    assert all((t.data_ptr() - base) % 256 == 0 for t in out.values() if t.numel())
    assert cio._read_whole_file(path, torch.device("cpu"), torch.float32) is None
    # A header whose offsets overlap is not read by this path (safe_open then names the problem).
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header["t1"]["data_offsets"] = header["t0"]["data_offsets"]
    text = json.dumps(header).encode()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])
    assert cio._read_whole_file(bad, torch.device("cpu"), torch.float16) is None


def test_a_component_without_the_variant_loads_its_plain_weights(tmp_path):
    """As diffusers: a folder whose UNet alone is fp16 loads with variant="fp16" (the others' plain weights); a variant
    that no component has is still an error, and `info` reads the files that loading reads."""
    sds = random_components(TINY, seed=5)
    folder = ck.save_folder(tmp_path / "f", TINY, sds)
    for p in (folder / "unet").glob("*.safetensors"):
        p.rename(p.with_name("diffusion_pytorch_model.fp16.safetensors"))
    _, back = ck.load_folder(folder, "fp16")
    assert_same(back, sds)  # fp32 files, whatever their names
    info = checkpoint_info(folder, "fp16")
    assert info["ok"] and info["variants"] == ["fp16"]
    with pytest.raises(CheckpointError, match=r"no 'bf16' variant|bf16\.safetensors not found"):
        ck.load_folder(folder, "bf16")


def test_an_index_wins_over_a_stale_single_file_and_our_save_removes_stale_shards(tmp_path):
    """diffusers' sharded save over a folder leaves its single file behind, and loads the index: so do we. Our save
    over a sharded folder removes the shards and the index, so that no loader takes the old weights."""
    old, new = reference_pipeline("a", seed=6), reference_pipeline("a", seed=7)
    old.unet.save_pretrained(tmp_path / "unet")
    new.unet.save_pretrained(tmp_path / "unet", max_shard_size="300KB")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert_same({"unet": ck.load_component(tmp_path, "unet")}, {"unet": new.unet.state_dict()})
    folder = tmp_path / "g"
    new_sds = {c: getattr(new, c).state_dict() for c in COMPONENTS}
    new.unet.save_pretrained(folder / "unet", max_shard_size="300KB")
    assert ck.shard_files(folder, "unet")
    sds = random_components(TINY, seed=8)
    ck.save_folder(folder, TINY, sds)
    assert not ck.shard_files(folder, "unet")
    assert_same({"unet": ck.load_component(folder, "unet")}, {"unet": sds["unet"]})
    assert not torch.equal(sds["unet"]["conv_in.weight"], new_sds["unet"]["conv_in.weight"])


def test_hub_patterns_take_sharded_weights():
    from huggingface_hub.utils import filter_repo_objects

    from img2vid.hub import hub_patterns

    files = [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors.index.json",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
        "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model.bin",
        "svd_xt.safetensors",
    ]
    assert list(filter_repo_objects(files, allow_patterns=hub_patterns())) == files[:5]
    fp16 = list(filter_repo_objects(files, allow_patterns=hub_patterns("fp16")))
    assert fp16 == ["model_index.json", "unet/config.json", *files[5:7]]
    # with the repo's list: components without fp16 files take their plain ones (the VAE here), as loading does
    mixed = [*files, "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
    fp16 = list(filter_repo_objects(mixed, allow_patterns=hub_patterns("fp16", mixed)))
    assert fp16 == ["model_index.json", "unet/config.json", *files[5:7], *mixed[-2:]]
    # a variant no component has: no weights at all (loading then names what is missing), not every plain file
    assert not any("pytorch_model" in p for p in filter_repo_objects(mixed, allow_patterns=hub_patterns("fp32", mixed)))
    # a UNet given from elsewhere (from_pretrained(unet=...)): its config comes, its weights do not
    fp16 = list(filter_repo_objects(mixed, allow_patterns=hub_patterns("fp16", mixed, skip=("unet",))))
    assert fp16 == ["model_index.json", "unet/config.json", *mixed[-2:]]


def test_hub_download_asks_for_each_component_s_own_variant(monkeypatch, tmp_path):
    """resolve_pretrained lists the repo once with a variant, and asks snapshot_download for the plain weights of a
    component that lacks it; offline (local_files_only) or unlisted, only the variant's files. revision, cache_dir
    and token reach both calls, as in diffusers, and a revision the hub lacks is named."""
    import huggingface_hub
    from huggingface_hub.errors import RevisionNotFoundError

    from img2vid.hub import resolve_pretrained

    vae = "vae/diffusion_pytorch_model"
    listing = ["model_index.json", "unet/diffusion_pytorch_model.fp16.safetensors", f"{vae}.safetensors"]
    asked: list[dict] = []

    def snapshot(repo_id, allow_patterns, **where):
        asked.append({"patterns": allow_patterns, **where})
        return str(tmp_path)

    def listed(repo_id, revision=None, token=None):
        asked.append({"listed": (revision, token)})
        return listing

    def unreachable(repo_id, **kw):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", listed)
    assert (
        resolve_pretrained("someone/svd", variant="fp16", revision="v2", cache_dir=tmp_path, token="hf_x") == tmp_path
    )
    assert asked[-2] == {"listed": ("v2", "hf_x")}
    got = asked[-1]
    assert (got["revision"], got["cache_dir"], got["token"], got["local_files_only"]) == ("v2", tmp_path, "hf_x", False)
    assert f"{vae}.safetensors" in got["patterns"] and f"{vae}.fp16.safetensors" not in got["patterns"]
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in got["patterns"]
    resolve_pretrained("someone/svd", variant="fp16", local_files_only=True)
    assert f"{vae}.fp16.safetensors" in asked[-1]["patterns"] and "listed" not in asked[-2]
    monkeypatch.setattr(huggingface_hub, "list_repo_files", unreachable)
    resolve_pretrained("someone/svd", variant="fp16")
    assert f"{vae}.fp16.safetensors" in asked[-1]["patterns"]
    resolve_pretrained("someone/svd", variant="fp16", skip=("unet",))  # as from_pretrained(unet=...) asks
    assert (
        not any(p.startswith("unet/diffusion") for p in asked[-1]["patterns"])
        and "unet/config.json" in asked[-1]["patterns"]
    )

    def no_revision(repo_id, allow_patterns, **where):
        error = RevisionNotFoundError.__new__(RevisionNotFoundError)  # its __init__ wants an HTTP response
        Exception.__init__(error, "404 Revision Not Found")
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_revision)
    with pytest.raises(
        CheckpointError, match=r"^someone/svd: no revision 'v9' \(a branch, tag or commit\) on the hub$"
    ):
        resolve_pretrained("someone/svd", revision="v9")


def test_long_names_and_unwritable_places_name_the_user_s_path(tmp_path):
    """A 250-byte file name is legal, but its temporary name (".{name}.{pid}.tmp") was not; a write that fails names
    the file asked for, not a hidden temporary one."""
    folder = ck.save_folder(tmp_path / "m", TINY, random_components(TINY))
    long_file = tmp_path / ("s" * 238 + ".safetensors")
    assert convert(folder, long_file) == long_file and checkpoint_info(long_file)["ok"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    (tmp_path / "blocker").write_text("a file where a folder would go")
    with pytest.raises(OSError) as e:
        ck.save_single_file(tmp_path / "blocker" / "x.safetensors", TINY, random_components(TINY))
    assert str(e.value).startswith(f"cannot write {tmp_path / 'blocker' / 'x.safetensors'}: "), e.value


def test_convert_dtype_wins_over_the_variant_and_integer_dtypes_are_refused(tmp_path):
    folder = ck.save_folder(tmp_path / "f", TINY, random_components(TINY))
    out = convert(folder, tmp_path / "g", dtype=torch.bfloat16, variant="fp16")
    assert ck.load_component(out, "unet", "fp16", dtype=None)["conv_in.weight"].dtype == torch.bfloat16
    with pytest.raises(CheckpointError, match="cannot save weights as torch.int8"):
        ck.save_single_file(tmp_path / "i.safetensors", TINY, random_components(TINY), dtype=torch.int8)
    assert not (tmp_path / "i.safetensors").exists()


@pytest.mark.parametrize(
    "rel, change, message",
    [
        ("scheduler/scheduler_config.json", {"sigma_min": 0.0}, "0 < sigma_min < sigma_max"),
        ("scheduler/scheduler_config.json", {"sigma_min": 800.0}, "0 < sigma_min < sigma_max"),
        # settings that give diffusers another schedule: refused, not run as SVD's default one
        ("scheduler/scheduler_config.json", {"use_karras_sigmas": False}, "use_karras_sigmas false is not supported"),
        ("scheduler/scheduler_config.json", {"use_beta_sigmas": True}, "use_beta_sigmas true is not supported"),
        ("scheduler/scheduler_config.json", {"timestep_type": "discrete"}, "timestep_type 'discrete' is not supp"),
        ("scheduler/scheduler_config.json", {"final_sigmas_type": "sigma_min"}, "final_sigmas_type 'sigma_min'"),
        ("vae/config.json", {"force_upcast": "false"}, "force_upcast must be a bool"),
        ("feature_extractor/preprocessor_config.json", {"image_mean": 0.5}, "image_mean must be a list of 3"),
    ],
)
def test_config_values_out_of_range_are_named(tmp_path, rel, change, message):
    folder = ck.save_folder(tmp_path / "f", TINY, random_components(TINY))
    data = json.loads((folder / rel).read_text())
    (folder / rel).write_text(json.dumps({**data, **change}))
    with pytest.raises(CheckpointError, match=message):
        ck.read_pipeline_config(folder)


def test_a_config_that_builds_no_model_names_the_folder_in_load_info_and_convert(tmp_path):
    """Heads that do not divide the channels: the error said only "32 channels do not split into 3 attention heads",
    from the model's constructor; now which folder, which component."""
    from img2vid.checkpoint_tools import checkpoint_info

    folder = ck.save_folder(tmp_path / "f", TINY, random_components(TINY))
    data = json.loads((folder / "unet/config.json").read_text())
    (folder / "unet/config.json").write_text(json.dumps({**data, "num_attention_heads": [3, 5]}))
    needle = rf"^{re.escape(str(folder))}: the unet cannot be built from its config: 32 channels do not split into 3"
    for call in (
        lambda: ck.load_folder(folder),
        lambda: checkpoint_info(folder),
        lambda: convert(folder, tmp_path / "g"),
    ):
        with pytest.raises(CheckpointError, match=needle):
            call()


def test_a_temporal_vae_ignores_norm_num_groups_as_diffusers():
    cfg = configs.vae_to_diffusers(TINY.vae)
    assert TINY.vae.temporal_decoder and "norm_num_groups" not in cfg
    assert configs.vae_from_diffusers({**cfg, "norm_num_groups": 16}).norm_num_groups == 32


def test_bad_devices_and_dtypes_are_one_line_errors(tmp_path):
    from img2vid import Pipeline
    from img2vid.errors import InputError

    folder = ck.save_folder(tmp_path / "f", TINY, random_components(TINY))
    single = ck.save_single_file(tmp_path / "s.safetensors", TINY, random_components(TINY))
    missing = f"cuda:{torch.cuda.device_count()}"
    for path in (folder, single):
        for device, message in [(missing, "is not available"), ("meta", "unknown device"), ("nope", "unknown device")]:
            with pytest.raises(InputError, match=message):
                Pipeline.from_pretrained(path, device=device)
        with pytest.raises(InputError, match="torch_dtype must be torch.float16, bfloat16"):
            Pipeline.from_pretrained(path, torch_dtype=torch.int8)
    assert Pipeline.from_pretrained(folder, torch_dtype="float16").dtype == torch.float16


def test_cpu_index_zero_impossible_sizes_and_zero_scales(tmp_path):
    from img2vid import Pipeline
    from img2vid.errors import InputError
    from img2vid.unet import UNet

    folder = ck.save_folder(tmp_path / "f", TINY, random_components(TINY))
    assert Pipeline.from_pretrained(folder, device="cpu:0").device.type == "cpu"
    data = json.loads((folder / "vae" / "config.json").read_text())
    (folder / "vae" / "config.json").write_text(json.dumps({**data, "scaling_factor": 0}))
    with pytest.raises(CheckpointError, match="scaling_factor must be positive"):
        ck.read_pipeline_config(folder)
    config = replace(TINY, unet=replace(TINY.unet, num_attention_heads=(3,) * len(TINY.unet.num_attention_heads)))
    with pytest.raises(CheckpointError, match="the unet cannot be built from its config"):
        ck.build(UNet, config.unet, {}, "unet")
    with pytest.raises(InputError, match="torch_dtype must be"):
        Pipeline.from_pretrained(folder, torch_dtype=torch.float8_e4m3fn)


def test_an_unknown_component_name_is_an_error_not_the_image_encoder():
    with pytest.raises(ValueError, match="unknown component 'text_encoder'"):
        ck.model_class("text_encoder")
    with pytest.raises(ValueError, match="unknown component 'unets'"):
        configs.component_from_config("unets", {})


def test_detection_needs_every_signature_key_and_counts_the_unused_ones(real_keys):
    """A diffusers UNet is told by its time embedding AND conv_in, a VAE by its encoder AND decoder: one of the pair
    alone (an encoder-only file, a stray conv_in) is "unknown", not a component that then fails to load. split_sgm
    counts the known-unused tensors it skips (`img2vid info` reports them): svd_xt's 6 text-tower + 248 embedders.3."""
    vae = meta_state_dicts(TINY, ours=False)["vae"]
    assert detect_format(["conv_in.weight"]) == "unknown"
    assert detect_format(["time_embedding.linear_1.weight"]) == "unknown"
    assert detect_format([k for k in vae if k.startswith("encoder.")]) == "unknown"
    config = with_decoder(preset("svd-xt"), True)
    header = {k: torch.empty(tuple(v[0]), device="meta") for k, v in real_keys["svd_xt"]["tensors"].items()}
    _, unknown, skipped = split_sgm(header, config)
    assert unknown == [] and skipped == 6 + 248


def test_a_conditioning_quant_conv_of_another_shape_is_not_taken():
    """embedders.3 with the very same encoder but a quant_conv not (n, n, 1, 1) (here stored as a plain (n, n)
    matrix) is not the temporal VAE's: the identity is, as with no embedders.3 (taking it failed the shape check)."""
    sds = random_components(TINY, seed=6)
    sgm = components_to_sgm(sds, TINY)
    cond = conditioning_encoder_copy(sgm)
    cond["conditioner.embedders.3.encoder.quant_conv.weight"] = torch.randn(8, 8)
    cond["conditioner.embedders.3.encoder.quant_conv.bias"] = torch.randn(8)
    vae = sgm_to_components(sgm | cond, TINY)["vae"]
    assert torch.equal(vae["quant_conv.weight"], torch.eye(8)[:, :, None, None])
    assert torch.equal(vae["quant_conv.bias"], torch.zeros(8))
