"""A component from elsewhere (`from_pretrained(..., unet=...)`, `--unet`): a fine-tuned UNet as a diffusers
component folder, a pipeline folder, a bare weights file, an sgm file (whole or UNet alone) or a module; it gives
what diffusers gives with the same component, the base's own copy is not read, and what cannot fit is refused."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import make_image, perturb_, reference_pipeline, rel_err
from safetensors.torch import load_file, save_file

from img2vid import config_checks, configs
from img2vid.components import load_source
from img2vid.errors import CheckpointError, InputError
from img2vid.pipeline import Pipeline
from img2vid.sgm_keys import POSITION_IDS

H, W = 32, 48
CALL = dict(height=H, width=W, num_frames=3, num_inference_steps=2, output_type="pt")


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """Another tiny pipeline of shape "a" (other weights) whose UNet plays the fine-tune, saved as diffusers saves a
    UNet alone and as a whole pipeline."""
    root = tmp_path_factory.mktemp("finetuned")
    ref = reference_pipeline("a", seed=7)
    ref.unet.save_pretrained(root / "ft-unet")
    ref.save_pretrained(root / "ft-pipe")
    return root


def frames(pipe, seed: int = 0) -> torch.Tensor:
    out = pipe(make_image(), generator=torch.manual_seed(seed), **CALL).frames
    return torch.as_tensor(np.asarray(out)) if not isinstance(out, torch.Tensor) else out


def unet_weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def assert_same_weights(module: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    sd = module.state_dict()
    assert sd.keys() == expected.keys()
    for k, t in expected.items():
        assert torch.equal(sd[k], t), k


def test_finetuned_unet_gives_diffusers_video(tiny_model_dir, finetuned):
    """diffusers: from_pretrained(base, unet=UNetSpatioTemporalConditionModel.from_pretrained(ft)); ours the same
    with the folder's path: the same frames, and the base's VAE and image encoder."""
    from diffusers import StableVideoDiffusionPipeline, UNetSpatioTemporalConditionModel

    ref_unet = UNetSpatioTemporalConditionModel.from_pretrained(finetuned / "ft-unet")
    # float32 named: transformers 5 reads the encoder in the dtype its config.json names (the fp16 save wrote it)
    ref = StableVideoDiffusionPipeline.from_pretrained(tiny_model_dir, unet=ref_unet, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    ours = Pipeline.from_pretrained(tiny_model_dir, unet=finetuned / "ft-unet")
    ours.set_progress_bar_config(disable=True)
    assert_same_weights(ours.unet, unet_weights(finetuned / "ft-unet"))
    base = Pipeline.from_pretrained(tiny_model_dir)
    assert_same_weights(ours.vae, base.vae.state_dict())
    want, got = frames(ref), frames(ours)
    assert rel_err(got, want) < 1e-4
    assert rel_err(frames(base), want) > 1e-2  # the UNet given is the one that ran


def test_every_kind_of_source_gives_the_same_unet(tiny_model_dir, finetuned, tmp_path):
    expected = unet_weights(finetuned / "ft-unet")
    bare = tmp_path / "my_unet.safetensors"  # diffusers' names, no config beside it: the pipeline's config
    shutil.copy(finetuned / "ft-unet" / "diffusion_pytorch_model.safetensors", bare)
    whole = Pipeline.from_pretrained(finetuned / "ft-pipe")
    sgm_whole = whole.save_single_file(tmp_path / "ft_whole.safetensors")
    sgm_unet = tmp_path / "ft_unet_sgm.safetensors"  # the UNet alone in sgm names, as ComfyUI saves one
    sd = load_file(str(sgm_whole))
    save_file({k: t for k, t in sd.items() if k.startswith("model.diffusion_model.")}, str(sgm_unet))
    sources = [finetuned / "ft-unet", str(finetuned / "ft-unet"), finetuned / "ft-pipe", bare, sgm_whole, sgm_unet]
    for source in sources:
        pipe = Pipeline.from_pretrained(tiny_model_dir, unet=source)
        assert_same_weights(pipe.unet, expected)
    wrapped = Pipeline.from_pretrained(tiny_model_dir, unet=torch.compile(whole.unet))  # the module it wraps
    assert wrapped.unet is whole.unet
    module = Pipeline.from_pretrained(tiny_model_dir, unet=whole.unet, torch_dtype=torch.float16)
    assert module.unet is whole.unet and whole.unet.dtype == torch.float16  # moved and cast, as pipe.to would
    assert module.vae.dtype == torch.float16


def test_diffusers_and_transformers_objects_as_components(tiny_model_dir, finetuned, tmp_path):
    """diffusers' from_pretrained(base, unet=<its UNet object>) works with ours too: the object's config and weights
    are read as its saved folder would be (the same weights and frames), in the dtype asked for, and the user's
    object is left as it was (not moved, not cast)."""
    from diffusers import UNetSpatioTemporalConditionModel

    ref_unet = UNetSpatioTemporalConditionModel.from_pretrained(finetuned / "ft-unet")
    ours = Pipeline.from_pretrained(tiny_model_dir, unet=ref_unet)
    assert isinstance(ours.unet, type(Pipeline.from_pretrained(tiny_model_dir).unet))
    assert_same_weights(ours.unet, unet_weights(finetuned / "ft-unet"))
    from_folder = Pipeline.from_pretrained(tiny_model_dir, unet=finetuned / "ft-unet")
    assert torch.equal(frames(ours), frames(from_folder))
    half = Pipeline.from_pretrained(tiny_model_dir, unet=ref_unet, torch_dtype=torch.bfloat16)
    assert half.unet.dtype == torch.bfloat16 and ref_unet.dtype == torch.float32
    assert_same_weights(half.unet, {k: t.bfloat16() for k, t in unet_weights(finetuned / "ft-unet").items()})
    # the VAE and the CLIP tower of another pipeline, as objects: as their saved folders
    donor = reference_pipeline("a", seed=9)
    donor.vae.save_pretrained(tmp_path / "vae")
    donor.image_encoder.save_pretrained(tmp_path / "enc")
    objects = Pipeline.from_pretrained(tiny_model_dir, vae=donor.vae, image_encoder=donor.image_encoder)
    folders = Pipeline.from_pretrained(tiny_model_dir, vae=tmp_path / "vae", image_encoder=tmp_path / "enc")
    assert_same_weights(objects.vae, folders.vae.state_dict())
    assert_same_weights(objects.image_encoder, folders.image_encoder.state_dict())
    assert objects.config == folders.config
    # one of another architecture is refused as its folder is, naming the object
    other = reference_pipeline("b", seed=0).unet  # 48-wide cross-attention
    with pytest.raises(CheckpointError, match="cross-attention reads 48-wide"):
        Pipeline.from_pretrained(tiny_model_dir, unet=other)


def test_a_given_component_is_not_read_from_the_base(tiny_model_dir, finetuned, tmp_path):
    """The base's own UNet file is never opened: here it is garbage, and loading still works (a single file too)."""
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    for f in (base / "unet").glob("*.safetensors"):
        f.write_bytes(b"not a safetensors file")
    pipe = Pipeline.from_pretrained(base, unet=finetuned / "ft-unet")
    assert_same_weights(pipe.unet, unet_weights(finetuned / "ft-unet"))
    with pytest.raises(CheckpointError):
        Pipeline.from_pretrained(base)
    single = Pipeline.from_pretrained(tiny_model_dir).save_single_file(tmp_path / "base.safetensors")
    pipe = Pipeline.from_single_file(single, unet=finetuned / "ft-unet")
    assert_same_weights(pipe.unet, unet_weights(finetuned / "ft-unet"))


def test_a_given_component_is_not_downloaded(tiny_model_dir, finetuned, monkeypatch):
    """With a hub id, the given UNet's weights are not asked of the hub (gigabytes for SVD-XT's); its config is."""
    import huggingface_hub

    asked = []

    def snapshot(repo_id, allow_patterns, **where):
        asked.append(allow_patterns)
        return str(tiny_model_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    pipe = Pipeline.from_pretrained("someone/svd", unet=finetuned / "ft-unet")
    assert_same_weights(pipe.unet, unet_weights(finetuned / "ft-unet"))
    assert "unet/config.json" in asked[0] and not any(p.startswith("unet/diffusion") for p in asked[0])
    assert any(p.startswith("vae/diffusion") for p in asked[0])


def test_variant_of_a_component_folder(tiny_model_dir, finetuned, tmp_path):
    """The variant asked for is read where the component folder has it, its plain weights where it has not (as
    diffusers does for a pipeline folder's components)."""
    plain = Pipeline.from_pretrained(tiny_model_dir, variant="fp16", unet=finetuned / "ft-unet")
    assert_same_weights(plain.unet, unet_weights(finetuned / "ft-unet"))
    ft16 = tmp_path / "ft-unet"
    shutil.copytree(finetuned / "ft-unet", ft16)
    halved = {k: (t * 0.5).half() for k, t in unet_weights(ft16).items()}
    save_file(halved, str(ft16 / "diffusion_pytorch_model.fp16.safetensors"))
    pipe = Pipeline.from_pretrained(tiny_model_dir, variant="fp16", unet=ft16)
    assert_same_weights(pipe.unet, {k: t.float() for k, t in halved.items()})
    # a pipeline folder without the variant: its plain weights too
    plain = Pipeline.from_pretrained(tiny_model_dir, variant="fp16", unet=finetuned / "ft-pipe")
    assert_same_weights(plain.unet, unet_weights(finetuned / "ft-unet"))


def test_sources_that_do_not_fit_are_refused(tiny_model_dir, tiny_model_dirs, tmp_path):
    from diffusers import UNetSpatioTemporalConditionModel

    other = tiny_model_dirs["b"]  # another architecture: 48-wide cross-attention, a 3-level VAE
    with pytest.raises(CheckpointError, match="does not fit this pipeline.*cross-attention reads 48-wide"):
        Pipeline.from_pretrained(tiny_model_dir, unet=other / "unet")
    bare = tmp_path / "b_unet.safetensors"  # no config: read against the pipeline's, which it does not match
    shutil.copy(other / "unet" / "diffusion_pytorch_model.safetensors", bare)
    with pytest.raises(CheckpointError, match=r"b_unet.safetensors: unet weights do not match.*missing"):
        Pipeline.from_pretrained(tiny_model_dir, unet=bare)
    vae_file = tiny_model_dir / "vae" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(CheckpointError, match="diffusers-vae kind, not a unet"):
        Pipeline.from_pretrained(tiny_model_dir, unet=vae_file)
    with pytest.raises(CheckpointError, match="unet not found: .*nowhere"):
        Pipeline.from_pretrained(tiny_model_dir, unet=tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="neither model_index.json nor config.json"):
        Pipeline.from_pretrained(tiny_model_dir, unet=tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir / "unet", broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"^\S*broken/config.json: not valid JSON"):
        Pipeline.from_pretrained(tiny_model_dir, unet=broken)
    ref = UNetSpatioTemporalConditionModel.from_pretrained(tiny_model_dir / "unet")
    with pytest.raises(InputError, match="vae= takes img2vid's VAE, .*not a UNetSpatioTemporalConditionModel"):
        Pipeline.from_pretrained(tiny_model_dir, vae=ref)
    with pytest.raises(InputError, match="unet= takes img2vid's UNet, .*UNetSpatioTemporalConditionModel.*Linear"):
        Pipeline.from_pretrained(tiny_model_dir, unet=torch.nn.Linear(2, 2))
    with pytest.raises(InputError, match="vae= takes img2vid's VAE"):
        Pipeline.from_pretrained(tiny_model_dir, vae=Pipeline.from_pretrained(tiny_model_dir).unet)
    with pytest.raises(InputError, match="a variant .* not of one file"):
        load_source(bare, "unet", configs.preset("tiny"), "cpu", torch.float32, variant="fp16")


def test_other_components_and_their_configs(tiny_model_dir, tmp_path):
    """A VAE and an image encoder from other pipelines; the encoder keeps the pipeline's preprocessing (it belongs
    to the feature extractor, which stays)."""
    donor = reference_pipeline("a", seed=9)
    donor.vae.save_pretrained(tmp_path / "vae")
    donor.image_encoder.save_pretrained(tmp_path / "enc")
    pipe = Pipeline.from_pretrained(tiny_model_dir, vae=tmp_path / "vae", image_encoder=tmp_path / "enc")
    assert_same_weights(pipe.vae, load_file(str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")))
    enc = load_file(str(tmp_path / "enc" / "model.safetensors"))
    assert_same_weights(pipe.image_encoder, {k: t for k, t in enc.items() if k != POSITION_IDS})
    base = Pipeline.from_pretrained(tiny_model_dir)
    assert pipe.config.image_encoder.image_mean == base.config.image_encoder.image_mean


def test_pipeline_configs_must_fit_together(tmp_path, tiny_model_dir):
    """Each component's config may be fine alone and the three still not work together: refused at load, naming
    the pair (it failed at the first step with a matrix-product error)."""
    tiny = configs.preset("tiny")
    config_checks.check_pipeline(tiny)
    bad = configs.replace(tiny, unet=configs.replace(tiny.unet, in_channels=6))
    with pytest.raises(ValueError, match="UNet takes 6 channels in"):
        config_checks.check_pipeline(bad)
    bad = configs.replace(tiny, unet=configs.replace(tiny.unet, projection_class_embeddings_input_dim=25))
    with pytest.raises(ValueError, match="added time embedding takes 25"):
        config_checks.check_pipeline(bad)
    folder = tmp_path / "mixed"
    shutil.copytree(tiny_model_dir, folder)
    text = (folder / "image_encoder" / "config.json").read_text()
    (folder / "image_encoder" / "config.json").write_text(text.replace('"projection_dim": 32', '"projection_dim": 40'))
    with pytest.raises(CheckpointError, match="cross-attention reads 32-wide embeddings, the image encoder gives 40"):
        Pipeline.from_pretrained(folder)


def test_push_to_hub_uploads_what_save_pretrained_writes(tiny_model_dir, tmp_path, monkeypatch):
    """push_to_hub (diffusers'): the repo is created if missing and the saved folder uploaded (here into a local
    stand-in for the hub, which the tests cannot reach); what arrives loads back as the same pipeline. A hub failure
    is one line."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    remote = tmp_path / "remote"
    calls = []

    def create_repo(self, repo_id, **kw):
        calls.append(("create", repo_id, kw))

    def upload_folder(self, *, repo_id, folder_path, **kw):
        calls.append(("upload", repo_id, kw))
        shutil.copytree(folder_path, remote)
        return "commit-info"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    pipe = Pipeline.from_pretrained(tiny_model_dir)
    assert pipe.push_to_hub("me/my-svd", private=True, variant="fp16", commit_message="first") == "commit-info"
    assert calls[0] == ("create", "me/my-svd", {"private": True, "exist_ok": True})
    assert calls[1][1] == "me/my-svd" and calls[1][2]["commit_message"] == "first"
    assert (remote / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    back = Pipeline.from_pretrained(remote, variant="fp16")
    assert_same_weights(back.unet, {k: t.half().float() for k, t in pipe.unet.state_dict().items()})
    with pytest.raises(CheckpointError, match="not a hub repo id"):
        pipe.push_to_hub("no-owner")

    def refused(self, repo_id, **kw):
        import httpx  # huggingface_hub's transport

        response = httpx.Response(403, request=httpx.Request("POST", "https://huggingface.co/api/repos/create"))
        raise HfHubHTTPError("403 Forbidden: you cannot write to me/my-svd\nmore detail", response=response)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", refused)
    with pytest.raises(
        CheckpointError, match=r"^me/my-svd: upload failed \(403 Forbidden: you cannot write to me/my-svd\)$"
    ):
        pipe.push_to_hub("me/my-svd")


def test_an_image_decoder_vae_in_every_form_and_a_whole_pipeline_s_vae(tiny_model_dir, finetuned, tmp_path):
    """diffusers' AutoencoderKL (the *_image_decoder VAE) is taken as an object, its folder, the file inside that
    folder (read with the folder's config.json, not the pipeline's temporal one) and our module built from it: the
    same weights each time, and the pipeline's config says its decoder is 2D. A pipeline folder gives its own VAE
    (from its vae/ subfolder); a source that is neither a module nor a path is refused before anything is read."""
    from diffusers import AutoencoderKL

    vae_2d = configs.replace(configs.TINY_VAE, temporal_decoder=False)
    torch.manual_seed(0)
    ref = AutoencoderKL(**{k: v for k, v in configs.vae_to_diffusers(vae_2d).items() if not k.startswith("_")})
    perturb_(ref, 11)
    ref.save_pretrained(tmp_path / "vae2d")
    folder = Pipeline.from_pretrained(tiny_model_dir, vae=tmp_path / "vae2d")
    assert folder.config.vae.temporal_decoder is False
    want = {k: t.clone() for k, t in folder.vae.state_dict().items()}
    for source in (ref, tmp_path / "vae2d" / "diffusion_pytorch_model.safetensors", folder.vae):
        pipe = Pipeline.from_pretrained(tiny_model_dir, vae=source)
        assert pipe.config.vae == folder.config.vae, type(source).__name__
        assert_same_weights(pipe.vae, want)
    whole = Pipeline.from_pretrained(tiny_model_dir, vae=finetuned / "ft-pipe")
    assert_same_weights(whole.vae, Pipeline.from_pretrained(finetuned / "ft-pipe").vae.state_dict())
    with pytest.raises(InputError, match="unet= takes img2vid's UNet or a path, not int"):
        Pipeline.from_pretrained(tiny_model_dir, unet=5)
