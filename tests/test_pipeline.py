"""End-to-end parity with diffusers' StableVideoDiffusionPipeline (float32, CPU, tiny random models loaded from the
folders diffusers itself saved), plus behaviour: determinism, output types, offload/chunking invariance."""

from __future__ import annotations

import io
import pickle
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import make_image, rel_err

from img2vid import Pipeline, PipelineOutput
from img2vid.configs import preset
from img2vid.errors import InputError, NonFiniteVideo
from img2vid.images import load_image
from img2vid.inputs import to_host

H, W = 32, 48  # non-square; tiny VAE (2 levels) and UNet (2-3 levels) need multiples of 8


@pytest.fixture(scope="module")
def pipes(tiny_model_dirs):
    out = {}
    for s, d in tiny_model_dirs.items():
        p = Pipeline.from_pretrained(d)
        p.set_progress_bar_config(disable=True)
        out[s] = p
    return out


def both(ref, ours, **kw):
    """Run both pipelines with the same seed; return (ref, ours) frames as tensors."""
    out = []
    for p in (ref, ours):
        kw2 = dict(kw)
        kw2["generator"] = torch.manual_seed(kw.pop("seed", 0)) if "seed" in kw else torch.manual_seed(0)
        res = p(**kw2).frames
        out.append(torch.as_tensor(np.asarray(res)) if not isinstance(res, torch.Tensor) else res)
    return out


CASES = {
    "basic-nonsquare-frames3-chunk2": dict(num_frames=3, decode_chunk_size=2),
    "videos_per_prompt2": dict(num_frames=4, decode_chunk_size=2, num_videos_per_prompt=2),
    "guidance-off": dict(num_frames=4, max_guidance_scale=1.0),
    "custom-sigmas": dict(num_frames=2, sigmas=[700.0, 30.0, 2.0, 0.1, 0.0]),
    "micro-conditioning": dict(num_frames=2, fps=12, motion_bucket_id=180, noise_aug_strength=0.1),
}


# Every case on shape "a"; shape "b" (other channels, depths, heads, a 3-level VAE and UNet) covers the core ones.
PARITY = [("a", c) for c in CASES] + [("b", "basic-nonsquare-frames3-chunk2"), ("b", "videos_per_prompt2")]


@pytest.mark.parametrize("shape, case", PARITY)
def test_pipeline_matches_diffusers(reference_pipelines, pipes, shape, case):
    kw = dict(image=make_image(), height=H, width=W, num_inference_steps=3, **CASES[case])
    for output_type in ("latent", "pt"):
        ref, ours = both(reference_pipelines[shape], pipes[shape], output_type=output_type, **kw)
        assert ref.shape == ours.shape
        assert rel_err(ours, ref) < 1e-4, (case, output_type, rel_err(ours, ref))


def test_batch_of_two_images(reference_pipelines, pipes):
    imgs = [make_image(seed=1), make_image(seed=2)]
    kw = dict(image=imgs, height=H, width=W, num_frames=4, num_inference_steps=2, decode_chunk_size=4)
    ref, ours = both(reference_pipelines["a"], pipes["a"], output_type="pt", **kw)
    assert ours.shape == (2, 4, 3, H, W)
    assert rel_err(ours, ref) < 1e-4


def test_generator_lists_give_one_generator_per_video_as_diffusers(reference_pipelines, pipes):
    """diffusers takes a list of generators with one per video (images x num_videos_per_prompt); the per-image
    augmentation noise uses the first ones. Other lengths are refused there, even with latents given."""
    kw = dict(image=make_image(), height=H, width=W, num_frames=3, num_inference_steps=2, output_type="latent")
    outs = []
    for p in (reference_pipelines["a"], pipes["a"]):
        gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
        outs.append(p(num_videos_per_prompt=2, generator=gens, **kw).frames)
    assert outs[1].shape == (2, 3, 4, H // 2, W // 2)
    assert rel_err(outs[1], outs[0]) < 1e-4
    lat = torch.zeros(2, 3, 4, H // 2, W // 2)
    for n, extra in ((1, {}), (3, {}), (3, {"latents": lat})):
        gens = [torch.Generator().manual_seed(s) for s in range(n)]
        with pytest.raises(InputError, match=f"got {n} generators for 2 videos"):
            pipes["a"](num_videos_per_prompt=2, generator=gens, **kw, **extra)


def test_several_images_with_videos_per_prompt_pair_each_video_with_its_image(pipes):
    """Images [A, B] x 2 videos each are videos A, A, B, B: each equal to a call on its image alone with the same
    initial latents (no augmentation noise: nothing else is random). diffusers pairs the CLIP embeddings so but tiles
    the image latents A, B, A, B (README); ours pairs both."""
    kw = dict(height=H, width=W, num_frames=3, num_inference_steps=2, output_type="latent", noise_aug_strength=0.0)
    images = [make_image(seed=1), make_image(seed=2)]
    lat = torch.randn(4, 3, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(3))
    both = pipes["a"](images, num_videos_per_prompt=2, latents=lat, **kw).frames
    for i, image in enumerate([images[0], images[0], images[1], images[1]]):
        alone = pipes["a"](image, latents=lat[i : i + 1], **kw).frames
        assert rel_err(both[i : i + 1], alone) < 1e-4, i  # batch sizes differ: float rounding only


def test_size_defaults_and_sizes_off_the_unet_multiple_match_diffusers(reference_pipelines, pipes):
    """height/width None mean the UNet's sample_size in pixels, as in diffusers; and any multiple of the VAE's factor
    works, as there: shape "b" (3-level VAE and UNet) at 40x56 has latents 10x14, which the UNet halves to odd sides
    and upsamples back to each skip's size."""
    for shape, size in (("a", dict(height=None, width=None)), ("b", dict(height=40, width=56))):
        kw = dict(image=make_image(), num_frames=2, num_inference_steps=2, output_type="latent", **size)
        ref, ours = both(reference_pipelines[shape], pipes[shape], **kw)
        assert ours.shape == ref.shape
        assert rel_err(ours, ref) < 1e-4, shape
        side = pipes[shape].config.unet.sample_size  # None: the UNet's sample size, in latents
        assert ours.shape[-2:] == ((side, side) if size["height"] is None else (10, 14))
    assert pipes["a"].vae_scale_factor == reference_pipelines["a"].vae_scale_factor


def test_sigmas_make_num_inference_steps_unused_as_in_diffusers(reference_pipelines, pipes):
    kw = dict(image=make_image(), height=H, width=W, num_frames=2, output_type="latent", sigmas=[80.0, 5.0, 0.0])
    ref, ours = both(reference_pipelines["a"], pipes["a"], num_inference_steps=None, **kw)
    assert rel_err(ours, ref) < 1e-4


def test_step_end_callbacks_see_what_diffusers_shows_them(reference_pipelines, pipes):
    """A step-end callback reads pipe.num_timesteps, pipe.guidance_scale and pipe.do_classifier_free_guidance as in
    diffusers, and the latents it returns replace the pipeline's; only "latents" may be asked for (diffusers'
    _callback_tensor_inputs), not silently left out."""
    kw = dict(image=make_image(), height=H, width=W, num_frames=3, num_inference_steps=3, output_type="latent")
    seen, outs = [], []
    for p in (reference_pipelines["a"], pipes["a"]):

        def callback(pipe, i, t, tensors):
            g = pipe.guidance_scale
            seen.append((i, float(t), sorted(tensors), pipe.num_timesteps, bool(pipe.do_classifier_free_guidance)))
            seen.append((tuple(g.shape), g.dtype, g.flatten().tolist()))
            return {"latents": tensors["latents"] * 0.9}

        outs.append(p(generator=torch.manual_seed(0), callback_on_step_end=callback, **kw).frames)
    n = len(seen) // 2
    assert seen[:n] == seen[n:] and seen[0] == (0, seen[0][1], ["latents"], 3, True)
    assert seen[1][0] == (1, 3, 1, 1, 1)
    assert rel_err(outs[1], outs[0]) < 1e-4
    pipes["a"](generator=torch.manual_seed(0), num_videos_per_prompt=2, max_guidance_scale=1.0, **kw)
    assert pipes["a"].guidance_scale.shape == (2, 3, 1, 1, 1) and not pipes["a"].do_classifier_free_guidance
    assert pipes["a"]._callback_tensor_inputs == reference_pipelines["a"]._callback_tensor_inputs
    with pytest.raises(InputError, match=r"callback_on_step_end_tensor_inputs may only name 'latents'"):
        pipes["a"](callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["noise_pred"], **kw)


def test_to_takes_diffusers_keyword_forms():
    p = Pipeline.from_config("tiny")
    assert p.to(dtype=torch.float64) is p and p.dtype == torch.float64
    assert p.to(device="cpu", dtype=torch.float32).dtype == torch.float32 and p.device == torch.device("cpu")
    assert p.to("cpu", torch.float64).dtype == torch.float64 and p.to(torch.float32).dtype == torch.float32


def test_from_config_seeds_its_weights_without_touching_the_callers_random_stream():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    a = Pipeline.from_config("tiny", seed=5)
    assert torch.equal(torch.rand(4), expected)  # the global generator is where the caller left it
    b = Pipeline.from_config("tiny", seed=5)
    c = Pipeline.from_config("tiny", seed=6)
    w = "conv_in.weight"
    assert torch.equal(a.unet.state_dict()[w], b.unet.state_dict()[w])
    assert not torch.equal(a.unet.state_dict()[w], c.unet.state_dict()[w])


def test_diffusers_loading_arguments_and_attributes_that_scripts_use(tiny_model_dir, tmp_path):
    """diffusers snippets pass use_safetensors=True, low_cpu_mem_usage, device_map="cpu", force_download, dtype=;
    they read pipe.components, pipe.unet.dtype / .device, call maybe_free_model_hooks(), save_pretrained(...,
    safe_serialization=True) and to(..., silence_dtype_warnings=True): each was a TypeError or AttributeError."""
    kw = dict(use_safetensors=True, low_cpu_mem_usage=False, device_map="cpu", force_download=False)
    p = Pipeline.from_pretrained(tiny_model_dir, dtype=torch.float64, **kw)
    assert p.dtype == p.unet.dtype == p.vae.dtype == p.image_encoder.dtype == torch.float64
    assert p.unet.device == torch.device("cpu") and p.device == torch.device("cpu")
    assert set(p.components) == {"unet", "vae", "image_encoder"} and p.components["unet"] is p.unet
    assert p.maybe_free_model_hooks() is None and p.to("cpu", silence_dtype_warnings=True) is p
    assert (p.save_pretrained(tmp_path / "again", safe_serialization=True) / "model_index.json").is_file()
    refused = [
        (dict(use_safetensors=False), "needs allow_pickle=True"),
        (dict(device_map="balanced"), "splits a model across devices"),
        (dict(dtype=torch.float16, torch_dtype=torch.float32), "disagree"),
    ]
    for bad, message in refused:
        with pytest.raises(InputError, match=message):
            Pipeline.from_pretrained(tiny_model_dir, **bad)
    with pytest.raises(InputError, match="safetensors only"):
        p.save_pretrained(tmp_path / "pickles", safe_serialization=False)


def test_progress_bar_config_takes_tqdm_options_as_diffusers():
    """diffusers passes set_progress_bar_config's options to tqdm: desc, leave, file, position..."""
    import io

    p, log = Pipeline.from_config("tiny"), io.StringIO()
    p.set_progress_bar_config(desc="my video", leave=True, file=log, ascii=True)
    p(make_image(W, H), height=H, width=W, num_frames=2, num_inference_steps=3, output_type="latent")
    assert "my video" in log.getvalue() and "3/3" in log.getvalue()  # left on screen: leave=True
    assert list(p.progress_bar(range(3))) == [0, 1, 2] and "3/3" in log.getvalue().rsplit("\r", 1)[-1]
    with pytest.raises(InputError, match="progress_bar needs an iterable or a total"):
        p.progress_bar()
    with pytest.raises(InputError, match=r"tqdm has no option 'colour_of_bar'"):
        p.set_progress_bar_config(colour_of_bar="red")  # refused now, not at the next video's first bar
    p.set_progress_bar_config(disable=True)
    assert p.progress_bar(total=2).disable


def test_decode_chunks_never_span_two_videos(pipes):
    """diffusers flattens the batch before chunking (a chunk of 3 over 2 videos x 4 frames mixes them); here each
    video of a batch decodes to exactly the frames it gets alone."""
    p = pipes["a"]
    lat = torch.randn(2, 4, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(0))
    both_videos = p._decode_videos(lat, decode_chunk_size=3)
    for v in range(2):
        alone = p._decode_videos(lat[v : v + 1], decode_chunk_size=3)
        torch.testing.assert_close(both_videos[v : v + 1], alone, rtol=0, atol=1e-6)


def test_same_seed_same_frames_and_output_types(pipes):
    p = pipes["a"]
    kw = dict(image=make_image(), height=H, width=W, num_frames=3, num_inference_steps=2)
    a = p(generator=torch.manual_seed(7), output_type="np", **kw).frames
    b = p(generator=torch.manual_seed(7), output_type="np", **kw).frames
    c = p(generator=torch.manual_seed(8), output_type="np", **kw).frames
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.shape == (1, 3, H, W, 3) and a.dtype == np.float32 and a.min() >= 0 and a.max() <= 1
    pt = p(generator=torch.manual_seed(7), output_type="pt", **kw).frames
    assert pt.shape == (1, 3, 3, H, W) and pt.min() >= 0 and pt.max() <= 1
    # np is pt in diffusers' (B, F, H, W, C) layout: same frames, same order, channels last
    np.testing.assert_array_equal(a, pt.permute(0, 1, 3, 4, 2).numpy())
    lat = p(generator=torch.manual_seed(7), output_type="latent", **kw).frames
    assert lat.shape == (1, 3, 4, H // 2, W // 2)
    pil = p(generator=torch.manual_seed(7), output_type="pil", **kw).frames
    assert len(pil) == 1 and len(pil[0]) == 3 and isinstance(pil[0][0], PIL.Image.Image)
    assert pil[0][0].size == (W, H) and pil[0][0].mode == "RGB"
    np.testing.assert_array_equal(np.asarray(pil[0][1]), (a[0, 1] * 255).round().astype(np.uint8))
    tup = p(generator=torch.manual_seed(7), output_type="np", return_dict=False, **kw)
    assert np.array_equal(tup, a)
    assert a.flags.c_contiguous  # laid out where the frames were made, one copy to the host


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_to_host_gives_the_same_contiguous_values(device):
    """Frames leave the GPU through small pinned stages (inputs.to_host): chunk counts of one, several with a
    remainder, and an exact multiple, for float32 and uint8, from a permuted (non-contiguous) tensor."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.uint8):
        t = (torch.rand(2, 5, 3, 6, 7, generator=g) * 255).to(dtype).to(device).permute(0, 1, 3, 4, 2)
        size = t.numel() * t.element_size()
        for stage in (size, size // 7, size // 5, 2**20):
            out = to_host(t, stage_bytes=stage)
            assert out.device.type == "cpu" and out.is_contiguous() and out.dtype == dtype
            assert torch.equal(out, t.cpu())


def test_float16_encode_runs_the_encoder_in_float32_and_restores_it(tiny_model_dirs):
    """force_upcast VAEs encode in float32 (the encoder overflows in half precision): only the encoder and
    quant_conv are cast, and back afterwards, so the result is the float32 encoder's and the decoder stays half."""
    p = Pipeline.from_pretrained(tiny_model_dirs["a"], torch_dtype=torch.float16)
    assert p.config.vae.force_upcast
    x = torch.rand(1, 3, H, W) * 2 - 1
    decoder_before = {k: v.clone() for k, v in p.vae.decoder.state_dict().items()}
    out = p._encode(x)
    ref = Pipeline.from_pretrained(tiny_model_dirs["a"], torch_dtype=torch.float16).vae.float().encode_mean(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert {prm.dtype for prm in p.vae.parameters()} == {torch.float16}
    for k, v in p.vae.decoder.state_dict().items():
        assert torch.equal(v, decoder_before[k])


def test_offload_and_chunking_leave_frames_unchanged(tiny_model_dir, monkeypatch):
    """Offload moves weights, never values: bit-identical. Forward chunking and split guidance run the same math on
    smaller batches; the CPU's GEMM may then pick another kernel, so they agree to float rounding (1e-4 here, on
    values in [0, 1], after every step has compounded it)."""
    from img2vid.offload import SequentialOffload

    # The tiny model would fit in the always-resident small-layer allowance: stream everything, in small units.
    monkeypatch.setattr(SequentialOffload, "RESIDENT_BYTES", 0)
    monkeypatch.setattr(SequentialOffload, "UNIT_BYTES", 16 << 10)
    kw = dict(image=make_image(), height=H, width=W, num_frames=4, num_inference_steps=2, output_type="pt")
    base = Pipeline.from_pretrained(tiny_model_dir)
    base.set_progress_bar_config(disable=True)
    ref = base(generator=torch.manual_seed(3), decode_chunk_size=2, **kw).frames
    modes = {
        "model-offload": (lambda p: p.enable_model_cpu_offload(device="cpu"), 0.0),
        "sequential-offload": (lambda p: p.enable_sequential_cpu_offload(device="cpu"), 0.0),
        "forward-chunking": (lambda p: p.unet.enable_forward_chunking(), 1e-4),
        "low-memory": (lambda p: p.enable_low_memory(device="cpu"), 1e-4),
    }
    for mode, (setup, atol) in modes.items():
        p = Pipeline.from_pretrained(tiny_model_dir)
        p.set_progress_bar_config(disable=True)
        setup(p)
        low = mode.startswith("low-memory")
        out = p(generator=torch.manual_seed(3), **kw, **({} if low else {"decode_chunk_size": 2})).frames
        torch.testing.assert_close(out, ref, rtol=0, atol=atol, msg=mode)
        if "sequential" in mode or low:
            assert all(len(s.streamed) > 1 for s in p._sequential.values())  # weights really were streamed


def test_conv_layout_leaves_frames_unchanged(tiny_model_dir):
    """Channels-last conv weights (what eager GPU runs and compile() choose, `Pipeline._fit_layout`) make every
    activation of the UNet and the decoder channels-last: the same numbers up to float rounding."""
    from img2vid.layers import channels_last_

    kw = dict(image=make_image(), height=H, width=W, num_frames=4, num_inference_steps=2, output_type="pt")
    frames = []
    for last in (False, True):
        p = Pipeline.from_pretrained(tiny_model_dir)
        p.set_progress_bar_config(disable=True)
        channels_last_(p.unet, last)
        channels_last_(p.vae.decoder, last)
        assert p.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last) == last
        frames.append(p(generator=torch.manual_seed(3), decode_chunk_size=2, **kw).frames)
    torch.testing.assert_close(frames[1], frames[0], rtol=0, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_eager_gpu_layout_leaves_frames_unchanged():
    # On a GPU where norm_act's kernels run, the first call lays the conv weights channels-last (once); the frames
    # agree with an NCHW run to float16 rounding (the norms' float32 sums in another order)
    from img2vid import fused

    kw = dict(image=make_image(), height=64, width=64, num_inference_steps=2, output_type="pt")
    frames = []
    for fit in (False, True):
        pipe = Pipeline.from_config("tiny", torch.float16).to("cuda")
        pipe.set_progress_bar_config(disable=True)
        pipe._laid_out = not fit  # False: let the first call choose
        frames.append(pipe(generator=torch.manual_seed(0), **kw).frames)
        last = pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        assert last == (fit and fused._kernels_run_on(torch.device("cuda")))
    # values in [0, 1]; a few elements a float16 ulp or two of a late step apart, the rest far closer
    torch.testing.assert_close(frames[1], frames[0], rtol=0, atol=1e-2)
    assert (frames[1].float() - frames[0].float()).abs().mean() < 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_low_memory_on_gpu_streams_the_layout_and_leaves_frames_unchanged(monkeypatch):
    # Low-memory mode lays the weights out before its pinned copies are made, which keep the layout (channels-last
    # where norm_act's kernels run); its frames agree with the plain GPU pipeline's to float16 rounding
    from img2vid import fused
    from img2vid.offload import SequentialOffload

    monkeypatch.setattr(SequentialOffload, "RESIDENT_BYTES", 0)  # the tiny model would stay resident otherwise
    monkeypatch.setattr(SequentialOffload, "UNIT_BYTES", 16 << 10)

    # low-memory decodes 2 frames at a time by default (a different temporal context): the same for both
    kw = dict(image=make_image(), height=64, width=64, num_inference_steps=2, output_type="pt", decode_chunk_size=2)
    plain = Pipeline.from_config("tiny", torch.float16).to("cuda")
    low = Pipeline.from_config("tiny", torch.float16).enable_low_memory(device="cuda")
    frames = []
    for pipe in (plain, low):
        pipe.set_progress_bar_config(disable=True)
        frames.append(pipe(generator=torch.manual_seed(0), **kw).frames)
    copies = low._sequential["unet"].cpu_copies
    weight = low.unet.conv_in.weight
    assert copies[weight].is_pinned()
    want = fused._kernels_run_on(torch.device("cuda"))
    assert copies[weight].is_contiguous(memory_format=torch.channels_last) == want
    torch.testing.assert_close(frames[1], frames[0], rtol=0, atol=1e-2)
    assert (frames[1].float() - frames[0].float()).abs().mean() < 1e-3


def test_guidance_reuse_skips_the_uncond_half_between_full_steps(tiny_model_dir, monkeypatch):
    """guidance_reuse=N (approximate): the UNet sees both guidance halves (batch 2B) on every N-th step only and the
    conditional half (batch B) in between; 1 is exactly the default path. The video moves, but by far less than
    dropping guidance would; split halves and offload give the reuse path's own frames."""
    from img2vid.offload import SequentialOffload

    monkeypatch.setattr(SequentialOffload, "RESIDENT_BYTES", 0)  # stream every weight (see the test above)
    kw = dict(image=make_image(), height=H, width=W, num_frames=3, num_inference_steps=4, output_type="latent")
    p = Pipeline.from_pretrained(tiny_model_dir)
    p.set_progress_bar_config(disable=True)
    batches: list[int] = []
    p.unet.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))

    def run(pipe: Pipeline, **extra) -> torch.Tensor:
        batches.clear()
        return pipe(generator=torch.manual_seed(2), **kw, **extra).frames

    exact = run(p)
    assert batches == [2] * 4
    assert torch.equal(run(p, guidance_reuse=1), exact) and batches == [2] * 4
    steps = []
    reused = run(p, guidance_reuse=2, callback_on_step_end=lambda pipe, i, t, d: steps.append(i) or d)
    assert batches == [2, 1, 2, 1] and steps == [0, 1, 2, 3]
    unguided = run(p, max_guidance_scale=1.0)
    assert torch.isfinite(reused).all() and not torch.equal(reused, exact)
    err, guidance_effect = rel_err(reused, exact), rel_err(unguided, exact)
    assert 0 < err < 0.25 * guidance_effect, (err, guidance_effect)
    assert torch.equal(run(p, max_guidance_scale=1.0, guidance_reuse=3), unguided) and batches == [1] * 4

    p._split_guidance = True  # low memory: halves one after the other (same math, other GEMM sizes: rounding)
    assert rel_err(run(p, guidance_reuse=2), reused) < 1e-5 and batches == [1] * 6
    p._split_guidance = False
    p.enable_sequential_cpu_offload(device="cpu")  # weights move, values do not
    assert torch.equal(run(p, guidance_reuse=2), reused) and batches == [2, 1, 2, 1]
    assert len(p._sequential["unet"].streamed) > 1


def test_decode_chunking_matches_reference_and_is_exact_for_2d_decoder(reference_pipelines, pipes):
    """The temporal decoder mixes frames inside a chunk, so decode_chunk_size changes frames by design (diffusers
    does the same; the parity tests above cover chunks that do not divide the frame count). What holds: our chunked
    decode equals diffusers' chunked decode for one video, and chunking the per-frame 2D decoder changes nothing."""
    from img2vid.configs import replace
    from img2vid.vae import VAE

    lat = torch.randn(1, 5, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(1))
    ref = reference_pipelines["a"].decode_latents(lat, num_frames=5, decode_chunk_size=2)  # (1, 3, F, H, W)
    ours = pipes["a"].decode_latents(lat, num_frames=5, decode_chunk_size=2)  # (1, 3, F, H, W), as diffusers'
    assert ours.shape == ref.shape and rel_err(ours, ref) < 1e-4
    for bad in ((lat, 4), (lat, 5, 0), (lat[0], 5)):  # (5, 4) read as num_frames=4: an error, not swapped axes
        with pytest.raises(InputError):
            pipes["a"].decode_latents(*bad)
    p = pipes["a"]
    vae2d = VAE(replace(p.config.vae, temporal_decoder=False))
    saved = p.vae, p._decode, p.config
    try:
        p.vae, p._decode = vae2d, vae2d.decode_frames
        p.config = replace(p.config, vae=vae2d.config if hasattr(vae2d, "config") else p.config.vae)
        whole = p._decode_videos(lat, decode_chunk_size=5)
        for chunk in (1, 2, 3):
            assert rel_err(p._decode_videos(lat, decode_chunk_size=chunk), whole) < 1e-5
    finally:
        p.vae, p._decode, p.config = saved


def test_image_input_kinds_agree(pipes):
    """PIL, numpy uint8, a path and a [0,1] tensor of the same pixels give the same video; so do lists of arrays,
    float arrays, uint8 tensors and float64 tensors, where diffusers reads 0..255 values as they are or divides by
    255 twice, and draws float64 noise (README, "where we differ")."""
    p = pipes["a"]
    img = make_image(W, H)  # already the output size, so the tensor path needs no resize
    arr = np.asarray(img)
    ten = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    kw = dict(height=H, width=W, num_frames=2, num_inference_steps=2, output_type="pt")
    ref = p(img, generator=torch.manual_seed(0), **kw).frames
    more = ([arr], [arr.astype(np.float32) / 255], torch.from_numpy(arr).permute(2, 0, 1), ten.double())
    for x in (arr, ten, ten[None], *more):
        out = p(x, generator=torch.manual_seed(0), **kw).frames
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_tensor_images_resized_for_clip_like_pil(pipes):
    """diffusers skips the CLIP resize for tensors; we resize them like PIL images, so a tensor and the PIL image it
    came from get the same embedding even when not 224x224."""
    from img2vid.image_encoder import preprocess
    from img2vid.inputs import to_tensor as _to_tensor

    img = make_image(90, 60)
    t = torch.from_numpy(np.asarray(img)).permute(2, 0, 1).float() / 255
    cfg = pipes["a"].config.image_encoder
    torch.testing.assert_close(preprocess(t[None], cfg), preprocess(_to_tensor(img)[None], cfg))


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(height=31), "height 31 is not a multiple of 2"),  # the tiny VAE halves each side
        (dict(width=0), "width 0"),
        (dict(num_frames=0), "num_frames"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(output_type="gif"), "output_type"),
        (dict(sigmas=[1.0]), "sigmas"),
        (dict(guidance_reuse=0), "guidance_reuse must be an integer >= 1"),
        (dict(guidance_reuse=2.0), "guidance_reuse"),
        # Non-finite knobs would only come out as NaN frames (black once made bytes): named instead
        (dict(noise_aug_strength=float("nan")), "noise_aug_strength must be a finite number, got nan"),
        (dict(max_guidance_scale=float("inf")), "max_guidance_scale must be a finite number"),
        (dict(min_guidance_scale=float("nan")), "min_guidance_scale must be a finite number"),
        (dict(fps=float("inf")), "fps must be a finite number"),
        (dict(motion_bucket_id="127"), "motion_bucket_id must be a finite number"),
        (dict(max_guidance_scale=1e39), r"max_guidance_scale must lie within \+-65504"),
        # Tensors outside [0, 1]: 0-255 floats, [-1, 1] data, NaN
        (
            dict(image=torch.full((3, 40, 40), 200.0)),
            r"image tensor float values must be in \[0, 1\], got \[200, 200\]; for 0..255 data divide by 255$",
        ),
        (
            dict(image=torch.linspace(-1, 1, 3 * 40 * 40).view(3, 40, 40)),
            r"must be in \[0, 1\], got \[-1, 1\]; for \[-1, 1\] data pass \(x \+ 1\) / 2$",
        ),
        (dict(image=torch.full((1, 3, 40, 40), float("nan"))), "image tensor contains NaN or infinite values"),
        (dict(latents=torch.full((1, 2, 4, H // 2, W // 2), float("nan"))), "latents contain NaN or infinite values"),
    ],
)
def test_bad_arguments_give_clear_errors(pipes, kw, msg):
    args = dict(image=make_image(), height=H, width=W, num_frames=2, num_inference_steps=2) | kw
    with pytest.raises(InputError, match=msg):
        pipes["a"](**args)


def test_numpy_scalars_and_integer_image_batches_are_accepted(pipes):
    """numpy scalars are numbers like any other, and a (B, H, W, 3) batch of 8- or 16-bit samples loads frame by
    frame as image files do (16-bit scaled by 257), not divided by 255 as if every integer were 8-bit."""
    arr8 = np.asarray(make_image())  # (H, W, 3) uint8
    arr16 = arr8.astype(np.uint16) * 257  # the same picture in 16 bits
    kw = dict(height=H, width=W, num_frames=2, num_inference_steps=2, output_type="pt")
    ref = pipes["a"](arr8, generator=torch.manual_seed(0), **kw).frames
    for batch in (arr8[None], arr16[None]):
        out = pipes["a"](batch, generator=torch.manual_seed(0), **kw).frames
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    out = pipes["a"](
        arr8, generator=torch.manual_seed(0), fps=np.int64(7), noise_aug_strength=np.float32(0.02), **kw
    ).frames
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_zero_d_tensors_and_exif_tagged_pil_images_are_taken_as_diffusers_takes_them(reference_pipelines, pipes):
    """diffusers takes fps=torch.tensor(7) (its arithmetic works on 0-d tensors), which img2vid refused; and it takes
    a PIL image's pixels as stored, where img2vid applied the EXIF orientation (a rotated video: 0.26 off). Files
    are still turned upright where they are read (load_image, the CLI, the server), as diffusers' load_image does."""
    kw = dict(height=H, width=W, num_frames=2, num_inference_steps=2, output_type="pt")
    numbers = dict(fps=torch.tensor(7), noise_aug_strength=torch.tensor(0.02), max_guidance_scale=torch.tensor(3.0))
    ref, ours = both(reference_pipelines["a"], pipes["a"], image=make_image(), **numbers, **kw)
    assert rel_err(ours, ref) < 1e-4
    plain = pipes["a"](make_image(), generator=torch.manual_seed(0), **kw).frames
    torch.testing.assert_close(ours, plain, rtol=0, atol=0)
    tagged = io.BytesIO()
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees to show
    make_image(56, 40).save(tagged, "PNG", exif=exif)
    image = PIL.Image.open(tagged)
    ref, ours = both(reference_pipelines["a"], pipes["a"], image=image, **kw)
    assert rel_err(ours, ref) < 1e-4
    assert load_image(image).size == (40, 56)  # load_image still turns it upright


def test_single_file_generates_the_same_frames_as_the_folder(tiny_model_dir, tmp_path):
    """Stability's single-file layout (sgm names, written by our converter from the diffusers folder) loads and gives
    the frames of the same weights in the diffusers layout. The weights come back bit-identical (test_checkpoint; the
    temporal VAE's quant_conv travels in sgm's conditioning-autoencoder slot); the CLIP q/k/v projections are then
    views into sgm's fused in_proj tensor, which moves the float32 embedding by an ulp, so frames match to rounding."""
    from img2vid.checkpoint_tools import convert

    single = convert(tiny_model_dir, tmp_path / "svd_tiny.safetensors")
    kw = dict(image=make_image(), height=H, width=W, num_frames=3, num_inference_steps=2, output_type="pt")
    outs = []
    for p in (Pipeline.from_pretrained(tiny_model_dir), Pipeline.from_single_file(single)):
        p.set_progress_bar_config(disable=True)
        outs.append(p(generator=torch.manual_seed(0), **kw).frames)
    assert rel_err(outs[1], outs[0]) < 1e-5
    # from_pretrained accepts the file too, as the CLI's --model does.
    again = Pipeline.from_pretrained(single)
    again.set_progress_bar_config(disable=True)
    torch.testing.assert_close(again(generator=torch.manual_seed(0), **kw).frames, outs[1], rtol=0, atol=0)


@pytest.mark.parametrize("shape", ["a", "b"])
def test_loaded_modules_match_reference_modules(reference_pipelines, pipes, shape):
    """Each component of a pipeline loaded with Pipeline.from_pretrained from the folder diffusers saved agrees with
    the reference component it came from: UNet, VAE encode (posterior mode), VAE decode, CLIP image embedding."""
    ref, ours = reference_pipelines[shape], pipes[shape]
    g = torch.Generator().manual_seed(4)
    c = ours.config
    x = torch.randn(2, 3, c.unet.in_channels, 8, 12, generator=g)
    t = torch.tensor([0.3, -1.2])
    ctx = torch.randn(2, 1, c.unet.cross_attention_dim[0], generator=g)
    ids = torch.tensor([[6.0, 127.0, 0.02], [11.0, 30.0, 0.5]])
    with torch.no_grad():
        # the UNet is called as diffusers' is, in its own pipeline and in custom loops (the same code on both)
        for unet in (ref.unet, ours.unet):
            got = unet(x, t, encoder_hidden_states=ctx, added_time_ids=ids, return_dict=False)[0]
            assert torch.equal(unet(x, t, encoder_hidden_states=ctx, added_time_ids=ids).sample, got)
            one = unet(x[:1], 0.3, encoder_hidden_states=ctx[:1], added_time_ids=ids[:1]).sample  # a number as t
            assert rel_err(one, got[:1]) < 1e-6
        want = ref.unet(x, t, encoder_hidden_states=ctx, added_time_ids=ids, return_dict=False)[0]
        assert rel_err(ours.unet(x, t, ctx, ids).sample, want) < 1e-4
        img = torch.rand(2, 3, H, W, generator=g) * 2 - 1
        z = torch.randn(6, 4, 8, 12, generator=g)  # two videos x 3 frames
        # the VAE called as diffusers' is (custom pipelines): the same code on both, the same numbers
        got = {}
        for name, vae in (("ref", ref.vae), ("ours", ours.vae)):
            dist = vae.encode(img).latent_dist
            assert torch.equal(vae.encode(img, return_dict=False)[0].mean, dist.mean)
            sampled = dist.sample(generator=torch.Generator().manual_seed(5))
            frames = vae.decode(z, num_frames=3).sample
            assert torch.equal(vae.decode(z, num_frames=3, return_dict=False)[0], frames)
            got[name] = (dist.mode(), dist.std, sampled, frames)
        for ours_t, ref_t in zip(got["ours"], got["ref"], strict=True):
            assert rel_err(ours_t, ref_t) < 1e-4
        assert rel_err(ours.vae.encode_mean(img), got["ref"][0]) < 1e-4
        pix = torch.randn(2, 3, 224, 224, generator=g)
        assert rel_err(ours.image_encoder(pix), ref.image_encoder(pix).image_embeds) < 1e-4


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler for inductor")
def test_compile_gives_the_same_video(tiny_model_dir):
    """Pipeline.compile(): one graph per denoising step, the decoder compiled block by block (so its frame slicing
    still bounds memory). Same frames as eager to float rounding, and the decoder's blocks really are compiled."""
    from img2vid.compiled import DECODER_BLOCKS

    torch._dynamo.reset()  # other tests compile the same code at other sizes (see test_unet's compile test)
    kw = dict(image=make_image(), height=H, width=W, num_frames=3, num_inference_steps=2, output_type="pt")
    p = Pipeline.from_pretrained(tiny_model_dir)
    p.set_progress_bar_config(disable=True)
    ref = p(generator=torch.manual_seed(5), decode_chunk_size=3, **kw).frames
    p.compile()
    blocks = [m for m in p.vae.decoder.modules() if isinstance(m, DECODER_BLOCKS)]
    assert blocks and all(m._compiled_call_impl is not None for m in blocks)
    assert "_head" in vars(p.vae.decoder)  # the output head, compiled as a function
    # Channels-last weights for what is compiled; the eager encoder keeps NCHW.
    assert p.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert p.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert p.vae.encoder.conv_in.weight.is_contiguous()
    out = p(generator=torch.manual_seed(5), decode_chunk_size=3, **kw).frames
    torch._dynamo.reset()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler for inductor")
def test_compiled_guidance_reuse_matches_eager(tiny_model_dir):
    """Under Pipeline.compile the two kinds of reuse step are their own compiled graphs and give eager's latents."""
    torch._dynamo.reset()
    kw = dict(image=make_image(), height=H, width=W, num_frames=3, num_inference_steps=3, output_type="latent")
    p = Pipeline.from_pretrained(tiny_model_dir)
    p.set_progress_bar_config(disable=True)
    ref = p(generator=torch.manual_seed(5), guidance_reuse=2, **kw).frames
    p.compile(decoder=False)
    out = p(generator=torch.manual_seed(5), guidance_reuse=2, **kw).frames
    torch._dynamo.reset()
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
)
def test_eager_video_never_imports_dynamo(device: str) -> None:
    # A custom op's first call imports torch._dynamo (seconds of a new process's first video); plain eager inference
    # calls the ops' functions directly (fused.direct_calls), so a whole video leaves dynamo unimported. A process
    # of its own: this test process may have imported it already. On CUDA in float16, img2vid's kernels run.
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        import PIL.Image
        import torch
        from img2vid import Pipeline, fused
        pipe = Pipeline.from_config("tiny", torch.float16 if "{device}" == "cuda" else torch.float32).to("{device}")
        pipe.set_progress_bar_config(disable=True)
        img = PIL.Image.fromarray(np.zeros((64, 64, 3), np.uint8))
        frames = pipe(img, num_inference_steps=2, output_type="np", height=64, width=64).frames
        print(frames.shape[1], "torch._dynamo" in sys.modules)
        with torch.no_grad():
            direct = fused.direct_calls()
        from torch.utils.flop_counter import FlopCounterMode
        with torch.no_grad(), FlopCounterMode(display=False):
            watched = fused.direct_calls()  # a dispatch mode sees the ops (their FLOP formulas), not their insides
        print(direct, watched, fused.direct_calls())  # the last with autograd on: the ops' backward
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, second = proc.stdout.split("\n")[:2]
    assert first.split() == [str(preset("tiny").num_frames), "False"]
    assert second.split() == ["True", "False", "False"]


def test_output_indexes_as_diffusers_base_output():
    pipe = Pipeline.from_config("tiny")
    out = pipe(make_image(64, 64), height=64, width=64, num_frames=2, num_inference_steps=1, output_type="pt")
    assert out[0] is out.frames and out["frames"] is out.frames and out.to_tuple() == (out.frames,)
    assert list(out.keys()) == ["frames"] and out[:1] == (out.frames,) and dict(out.items())["frames"] is out.frames
    # a mapping as diffusers' (an OrderedDict subclass): its length, iteration, dict(), and pickling
    assert isinstance(out, dict) and len(out) == 1 and list(out) == ["frames"] and dict(out)["frames"] is out.frames
    again = pickle.loads(pickle.dumps(out))
    assert isinstance(again, PipelineOutput) and torch.equal(again.frames, out.frames) and again[0] is again.frames
    out.frames = "x"  # the attribute and the key are one value
    assert out["frames"] == "x" and out.to_tuple() == ("x",)


def test_diffusers_attention_switches_are_accepted_and_change_nothing(reference_pipelines):
    """diffusers' recipes call enable_attention_slicing / xformers; for SVD slicing is a no-op there (no model of it
    has set_attention_slice: checked on the reference here), and here both leave the frames bit-identical."""
    ref = reference_pipelines["a"]
    assert not any(hasattr(m, "set_attention_slice") for m in (ref.unet, ref.vae, ref.image_encoder))
    pipe = Pipeline.from_config("tiny")
    pipe.set_progress_bar_config(disable=True)
    kw = dict(height=64, width=64, num_frames=2, num_inference_steps=2, output_type="pt")
    before = pipe(make_image(64, 64), generator=torch.manual_seed(3), **kw).frames
    pipe.enable_attention_slicing()
    pipe.enable_attention_slicing(1)
    pipe.enable_xformers_memory_efficient_attention()
    after = pipe(make_image(64, 64), generator=torch.manual_seed(3), **kw).frames
    pipe.disable_attention_slicing()
    pipe.disable_xformers_memory_efficient_attention()
    assert torch.equal(before, after)


def test_nan_weights_are_an_error_not_black_frames(tmp_path):
    """A checkpoint with NaN weights (or a float16 overflow) gives NaN frames, which diffusers casts to black ones
    silently: one error that names the likely causes; the CLI says it in one line, exit code 2, writes nothing."""
    pipe = Pipeline.from_config("tiny")
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        next(pipe.unet.parameters()).fill_(float("nan"))
    kw = dict(height=32, width=32, num_frames=2, num_inference_steps=1)
    for output_type in ("pil", "np", "pt"):
        with pytest.raises(NonFiniteVideo, match="the decoded video holds NaN values: the weights hold NaN"):
            pipe(make_image(64, 64), output_type=output_type, **kw)
    assert pipe(make_image(64, 64), output_type="latent", **kw).frames.isnan().all()  # latents: the caller's to read
    folder = tmp_path / "nan"
    pipe.save_pretrained(folder)
    image = tmp_path / "in.png"
    make_image(64, 64).save(image)
    out = tmp_path / "v.mp4"
    args = ["generate", str(image), "-o", str(out), "--model", str(folder), "--steps", "1", "--frames", "2"]
    done = subprocess.run(
        [sys.executable, "-m", "img2vid", *args, "--width", "32", "--height", "32", "--quiet"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "img2vid: error: the decoded video holds NaN values" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not out.exists()


def test_guidance_runs_when_only_the_first_frames_are_over_one():
    """min_guidance_scale 3 down to max 1: the first frames are guided (it used to be decided on max alone)."""
    pipe = Pipeline.from_config("tiny")

    def video(lo: float, hi: float) -> torch.Tensor:
        kw = dict(height=64, width=64, num_frames=3, num_inference_steps=2, output_type="pt")
        return pipe(
            make_image(64, 64), generator=torch.manual_seed(0), min_guidance_scale=lo, max_guidance_scale=hi, **kw
        ).frames

    assert not torch.equal(video(3.0, 1.0), video(1.0, 1.0))


@pytest.mark.parametrize(
    "image, message",
    [
        (torch.zeros(0, 3, 64, 64), "image tensor batch is empty"),
        (np.zeros((0, 64, 64, 3), np.uint8), "image array batch is empty"),
        (
            np.zeros((2, 3, 64, 64), np.float32),
            r"image arrays must be \(H, W, 3\) or \(B, H, W, 3\) .*got \(2, 3, 64, 64\)",
        ),
        (np.full((64, 64, 3), 200.0, np.float32), "image array float values must be in"),
    ],
)
def test_bad_image_batches_and_arrays_are_named(image, message):
    with pytest.raises(InputError, match=message):
        Pipeline.from_config("tiny")(image, height=64, width=64, num_frames=2, num_inference_steps=1)


def test_numpy_counts_zero_size_images_and_nested_sigmas():
    pipe = Pipeline.from_config("tiny")
    kw = dict(height=64, width=64, output_type="pt")
    a = pipe(
        make_image(64, 64),
        num_frames=np.int64(2),
        num_inference_steps=np.int64(1),
        generator=torch.manual_seed(0),
        **kw,
    )
    b = pipe(make_image(64, 64), num_frames=2, num_inference_steps=1, generator=torch.manual_seed(0), **kw)
    assert torch.equal(a.frames, b.frames)
    with pytest.raises(InputError, match="image tensor has zero size"):
        pipe(torch.zeros(1, 3, 8, 0), num_frames=2, num_inference_steps=1, **kw)
    with pytest.raises(InputError, match="sigmas must be one-dimensional"):
        pipe(make_image(64, 64), num_frames=2, sigmas=[[2.0, 1.0], [0.5, 0.0]], **kw)


def test_a_callback_steers_guidance_through_pipe_guidance_scale():
    """As diffusers' callback guide: assigning pipe._guidance_scale changes the guidance of the steps after it."""
    pipe = Pipeline.from_config("tiny")

    def run(callback=None) -> torch.Tensor:
        kw = dict(height=64, width=64, num_frames=3, num_inference_steps=3, output_type="pt")
        return pipe(make_image(64, 64), generator=torch.manual_seed(0), callback_on_step_end=callback, **kw).frames

    def weaker(p, i, t, tensors):
        if i == 0:
            p._guidance_scale = 1 + (p._guidance_scale - 1) * 0.25
        return {}

    def same(p, i, t, tensors):
        p._guidance_scale = p._guidance_scale.clone()
        return {}

    plain = run()
    assert torch.equal(run(same), plain) and not torch.equal(run(weaker), plain)
    with pytest.raises(InputError, match="pipe._guidance_scale set by a callback must be"):
        run(lambda p, i, t, tensors: setattr(p, "_guidance_scale", "strong") or {})
