#!/usr/bin/env python3
"""Speed, memory and agreement of img2vid against diffusers on one GPU, same weights, same card, same run.

    python benchmarks/svd_speed.py --compare diffusers                 # full SVD-XT, 25 frames, 576x1024, 25 steps
    python benchmarks/svd_speed.py --compare diffusers --modes eager,compiled,low-memory --load
    python benchmarks/svd_speed.py --modes compiled,compiled+fp8,compiled+reuse2   # approximate modes vs exact
    python benchmarks/svd_speed.py --model svd --size 576x1024 --modes eager   # SVD's 14 frames, portrait
    python benchmarks/svd_speed.py --tiny                              # logic check on CPU in seconds

The full-size SVD-XT architecture is built with seeded random weights (no download), kept on the CPU as one state
dict, and loaded into diffusers' classes and into ours in turn, so only one model is on the GPU while it is measured
and the peak-memory numbers are comparable. Rows: video seconds, UNet seconds per step (CUDA events around each
step), TFLOP/s (FlopCounterMode on one UNet step), VAE decode seconds, peak GiB allocated; and agreement with diffusers
in fp16: one UNet step, one VAE decode (relative error) and the whole video (PSNR). diffusers is a benchmark-only
dependency (never imported by img2vid). Approximate modes (+fp8, +reuseN) also report their PSNR from the exact
mode's video of the same run.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import PIL.Image
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from bench_utils import rel, unfuse_geglu  # noqa: E402

from img2vid import Pipeline, fused  # noqa: E402
from img2vid.configs import preset, scheduler_to_diffusers, unet_to_diffusers, vae_to_diffusers  # noqa: E402
from img2vid.image_encoder import ImageEncoder  # noqa: E402
from img2vid.longer import chain_segments  # noqa: E402
from img2vid.unet import UNet  # noqa: E402
from img2vid.vae import VAE  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--compare", choices=["diffusers", "none"], default="diffusers")
ap.add_argument(
    "--modes",
    default="eager,compiled,low-memory",
    help="comma list: eager, compiled, low-memory, low-memory-nosplit, offload, sequential (offload, sequential: the "
    "reference's memory recipes, model / sequential CPU offload + forward chunking + decode_chunk_size 2, as "
    "--diffusers-modes offload); eager/compiled take the approximate options "
    "+fp8 and +reuseN (e.g. compiled+fp8, compiled+reuse2), compared with the exact mode run before them, and "
    "+unfused (the GEGLU projections without the fused kernel: an A/B of it) and +notma (the path of a card before "
    "Hopper, which lacks TMA: the GEGLU projections through the kernel that loads through pointers); any img2vid mode "
    "takes +segmentsN (a longer video: N chained segments, img2vid.longer; PSNR of its first segment); low-memory "
    "modes take +ffchunkN (forward chunks of N frames instead of enable_low_memory's); eager/compiled take +parallel "
    "(guidance parallelism: the unconditional half on cuda:1, each eager half a CUDA graph; peak GiB is cuda:0's, "
    "cuda:1's in the note), +parallelnograph (eager halves queued from two host threads) or +parallel1thread (from "
    "one)",
)
ap.add_argument("--diffusers-modes", default="eager", help="comma list: eager, offload (model offload+chunk+dec2)")
ap.add_argument("--model", default="svd-xt", help="a preset: svd (14 frames), svd-xt, svd-xt-1.1 (25 frames)")
ap.add_argument("--size", default="1024x576", help="WIDTHxHEIGHT of the video, multiples of 64 (e.g. 576x1024)")
ap.add_argument("--steps", type=int, default=25)
ap.add_argument("--decode-chunk-size", type=int, default=8)
ap.add_argument("--compile-mode", default=None, help="torch.compile mode for --modes compiled (default inductor)")
ap.add_argument(
    "--compile-cache", default=None, help="compiled modes: Pipeline.compile(cache_dir=...), for svd_startup.py after"
)
ap.add_argument("--vae-frame-chunk", type=int, default=None, help="vae.spatial_frame_chunk for img2vid modes")
ap.add_argument("--load", action="store_true", help="also time Pipeline.from_pretrained of an fp16 folder")
ap.add_argument("--save-folder", default=None, help="with --load: keep the fp16 folder here (for svd_startup.py)")
ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU: checks the script's logic only")
ap.add_argument("--out", default=os.environ.get("OUT", "."))
args = ap.parse_args()
# Every other name used to run the offload recipe, labelled with that name (a "none" row was offload's numbers).
for _dmode in args.diffusers_modes.split(","):
    if _dmode not in ("eager", "offload"):
        ap.error(f"--diffusers-modes: unknown mode {_dmode!r} (eager, offload; --compare none runs no diffusers)")

DEV = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
DT = torch.float16 if DEV.type == "cuda" else torch.float32
CFG = preset("tiny" if args.tiny else args.model)
try:
    _w, _h = (int(v) for v in args.size.lower().split("x"))
except ValueError:
    ap.error(f"--size takes WIDTHxHEIGHT, got {args.size!r}")
if _w < 64 or _h < 64 or _w % 64 or _h % 64:
    ap.error(f"--size: width and height must be multiples of 64, got {args.size}")
H, W = (32, 48) if args.tiny else (_h, _w)
F = CFG.num_frames
STEPS = 3 if args.tiny else args.steps
DCS = 2 if args.tiny else args.decode_chunk_size
os.makedirs(args.out, exist_ok=True)
LOG = open(os.path.join(args.out, "svd_speed.log"), "a")
ROWS: list[dict] = []


def log(*a: object) -> None:
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    LOG.write(s + "\n")
    LOG.flush()


def sync() -> None:
    if DEV.type == "cuda":
        for i in range(torch.cuda.device_count()):  # every GPU: +parallel runs half of each step on a second one
            torch.cuda.synchronize(i)


def gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if DEV.type == "cuda" else float("nan")


def free() -> None:
    import gc

    gc.collect()
    if DEV.type == "cuda":
        torch.cuda.empty_cache()
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)


class Events:
    """CUDA events around a callable (outside any compiled region): no syncs while it runs."""

    def __init__(self) -> None:
        self.pairs: list[tuple] = []

    def wrap(self, fn: Callable) -> Callable:
        def timed(*a, **k):
            s = torch.cuda.Event(enable_timing=True) if DEV.type == "cuda" else time.perf_counter()
            if DEV.type == "cuda":
                s.record()
            r = fn(*a, **k)
            if DEV.type == "cuda":
                e = torch.cuda.Event(enable_timing=True)
                e.record()
            else:
                e = time.perf_counter()
            self.pairs.append((s, e))
            return r

        return timed

    def times(self) -> list[float]:
        sync()
        if DEV.type == "cuda":
            return [a.elapsed_time(b) / 1e3 for a, b in self.pairs]
        return [b - a for a, b in self.pairs]


def make_state() -> dict[str, dict[str, torch.Tensor]]:
    """Seeded random weights for every component, built on the GPU (fast init), kept on the CPU."""
    torch.manual_seed(0)
    out = {}
    with torch.device(DEV):
        for name, m in (
            ("unet", UNet(CFG.unet)),
            ("vae", VAE(CFG.vae)),
            ("image_encoder", ImageEncoder(CFG.image_encoder)),
        ):
            out[name] = {k: v.to("cpu", DT) for k, v in m.state_dict().items()}
            del m
    free()
    return out


def image() -> PIL.Image.Image:
    rng = np.random.RandomState(1234)
    y, x = np.mgrid[0:H, 0:W]
    base = np.stack([x / W, y / H, (x + y) / (W + H)], -1) * 200 + rng.uniform(0, 55, (H, W, 3))
    return PIL.Image.fromarray(base.clip(0, 255).astype(np.uint8))


# ---- diffusers -------------------------------------------------------------------------------------------------------
def diffusers_pipe(state):
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from img2vid.configs import clip_to_transformers

    def kw(d):
        return {k: v for k, v in d.items() if not k.startswith("_")}

    unet = UNetSpatioTemporalConditionModel(**kw(unet_to_diffusers(CFG.unet)))
    vae = AutoencoderKLTemporalDecoder(**kw(vae_to_diffusers(CFG.vae)))
    hf = {k: v for k, v in clip_to_transformers(CFG.image_encoder).items() if k != "architectures"}
    enc = CLIPVisionModelWithProjection(CLIPVisionConfig(**hf))
    for m, name in ((unet, "unet"), (vae, "vae"), (enc, "image_encoder")):
        missing, unexpected = m.load_state_dict(state[name], strict=False)
        assert not unexpected and all("position_ids" in k for k in missing), (name, missing, unexpected)
    fe = CLIPImageProcessor(
        crop_size={"height": 224, "width": 224},
        size={"shortest_edge": 224},
        image_mean=list(CFG.image_encoder.image_mean),
        image_std=list(CFG.image_encoder.image_std),
    )
    pipe = StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=enc,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(scheduler_to_diffusers(CFG.scheduler)),
        feature_extractor=fe,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(DT)


def ours_pipe(state) -> Pipeline:
    p = Pipeline.from_state_dicts(CFG, {c: dict(sd) for c, sd in state.items()})
    p.set_progress_bar_config(disable=True)
    return p


# ---- measuring -----------------------------------------------------------------------------------------------
def run_video(
    name: str,
    call: Callable,
    hook: Callable[[Events], None],
    decode_timer: list,
    note: str = "",
    mean_step: bool = False,
) -> np.ndarray:
    """One timed video; its row's step is the median step, or the mean where steps of two kinds alternate."""
    ev = Events()
    hook(ev)
    free()
    sync()
    t0 = time.perf_counter()
    frames = np.asarray(call())
    sync()
    total = time.perf_counter() - t0
    steps = ev.times()
    per = float(np.mean(steps) if mean_step else np.median(steps)) if steps else float("nan")
    row = dict(mode=name, video=total, step=per, decode=decode_timer[-1] if decode_timer else float("nan"), peak=gib())
    row["note"] = note
    row["finite"] = bool(np.isfinite(frames).all())
    ROWS.append(row)
    log(
        f"[{name}] video {total:.2f}s  step median {per * 1e3:.1f} ms (n={len(steps)})  decode {row['decode']:.3f}s  "
        f"peak {row['peak']:.2f} GiB  finite={row['finite']}  {note}"
    )
    if steps:  # where the video's time goes: a slow first step or the work around the loop hides behind a median
        rest = total - sum(steps) - row["decode"]
        log(
            f"[{name}] steps sum {sum(steps):.2f}s (first {steps[0] * 1e3:.0f} ms, min {min(steps) * 1e3:.0f}, "
            f"max {max(steps) * 1e3:.0f})  outside the steps and the decode {rest:.2f}s"
        )
    return frames


def timed_call(obj, attr: str, store: list) -> None:
    """Wrap obj.attr so each call's seconds (synced before and after) are appended to store."""
    orig = getattr(obj, attr)

    def wrapped(*a, **k):
        sync()
        t0 = time.perf_counter()
        r = orig(*a, **k)
        sync()
        store.append(time.perf_counter() - t0)
        return r

    setattr(obj, attr, wrapped)


def unet_inputs(in_ch: int, ctx: int) -> tuple:
    g = torch.Generator().manual_seed(5)
    lh, lw = H // 8, W // 8
    if args.tiny:
        lh, lw = H // 2, W // 2
    x = torch.randn(2, F, in_ch, lh, lw, generator=g).to(DEV, DT)
    t = torch.tensor(0.25 * math.log(20.0), device=DEV)
    emb = torch.randn(2, 1, ctx, generator=g).to(DEV, DT)
    ids = torch.tensor([[6.0, 127.0, 0.02]] * 2, device=DEV, dtype=DT)
    return x, t, emb, ids


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def main() -> None:
    log("=" * 100)
    import platform

    vers = f"python {platform.python_version()}  torch {torch.__version__}"
    try:
        import diffusers
        import transformers

        vers += f"  diffusers {diffusers.__version__}  transformers {transformers.__version__}"
    except ImportError:
        pass
    log(vers)
    if DEV.type == "cuda":
        log(f"device: {torch.cuda.get_device_name(0)}  date {time.strftime('%Y-%m-%d')}")
        try:
            log(
                subprocess.run(
                    ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    timeout=30,
                ).stdout.strip()
            )
        except Exception:
            pass
    size = f"{W}x{H} (width x height)"
    log(f"config: {CFG.name} {F} frames {size} steps {STEPS} decode_chunk {DCS} dtype {DT} argv {sys.argv[1:]}")
    state = make_state()
    img = image()
    gen = lambda: torch.manual_seed(42)  # noqa: E731
    call_kw = dict(height=H, width=W, num_frames=F, decode_chunk_size=DCS, output_type="np")
    ref: dict = {}

    if args.compare == "diffusers":
        for dmode in args.diffusers_modes.split(","):
            pipe = diffusers_pipe(state)
            dec: list = []
            if dmode == "eager":
                pipe.to(DEV)
            else:  # the reference's low-memory recipe
                pipe.enable_model_cpu_offload()
                pipe.unet.enable_forward_chunking()
            kw = dict(call_kw, decode_chunk_size=DCS if dmode == "eager" else 2)
            pipe(img, num_inference_steps=2, generator=gen(), **kw)  # warm-up
            timed_call(pipe, "decode_latents", dec)

            def hook(ev, pipe=pipe):
                pipe.unet.forward = ev.wrap(pipe.unet.forward)

            frames = run_video(
                f"diffusers {dmode}",
                lambda pipe=pipe, kw=kw: pipe(img, num_inference_steps=STEPS, generator=gen(), **kw).frames,
                hook,
                dec,
            )
            if dmode == "eager":
                ref["video"] = frames
                with torch.no_grad():
                    x, t, emb, ids = unet_inputs(CFG.unet.in_channels, CFG.unet.cross_attention_dim[0])
                    ref["unet_in"] = (x, t, emb, ids)
                    ref["unet"] = (
                        pipe.unet(x, t, encoder_hidden_states=emb, added_time_ids=ids, return_dict=False)[0]
                        .float()
                        .cpu()
                    )
                    z = torch.randn(DCS, 4, x.shape[-2], x.shape[-1], generator=torch.Generator().manual_seed(6)).to(
                        DEV, DT
                    )
                    ref["vae_in"] = z
                    ref["vae"] = pipe.vae.decode(z, num_frames=DCS).sample.float().cpu()
            del pipe
            free()

    flops = None
    exact_video: dict[str, np.ndarray] = {}  # our exact video per base mode, for the approximate modes' deviation
    tma_runs_on = fused._tma_runs_on
    for mode in args.modes.split(","):
        base, *options = mode.split("+")
        fp8 = "fp8" in options
        reuse = next((int(o[5:]) for o in options if o.startswith("reuse")), 1)
        segments = next((int(o[8:]) for o in options if o.startswith("segments")), 1)
        pipe = ours_pipe(state)
        note = ""
        if base.startswith("low-memory"):
            pipe.enable_low_memory(device=DEV, split_guidance=base != "low-memory-nosplit")
            ffchunk = next((int(o[7:]) for o in options if o.startswith("ffchunk")), None)
            if ffchunk is not None:  # another forward-chunking size than enable_low_memory's
                pipe.unet.enable_forward_chunking(ffchunk)
                note = f"forward chunks of {ffchunk} frames"
        elif base in ("offload", "sequential"):  # the recipes of the diffusers offload rows
            if base == "offload":
                pipe.enable_model_cpu_offload(device=DEV)
            else:
                pipe.enable_sequential_cpu_offload(device=DEV)
            pipe.unet.enable_forward_chunking()
        else:
            pipe.to(DEV)
        if fp8:
            note = f"APPROXIMATE: {pipe.enable_fp8()} linears in fp8"
        if reuse > 1:
            note = f"{note}; APPROXIMATE: guidance reuse {reuse}".lstrip("; ")
        if "unfused" in options:  # A/B: the GEGLU projections as cuBLAS + a gating kernel (before session 5)
            unfuse_geglu(pipe.unet)
            note = f"{note}; GEGLU unfused".lstrip("; ")
        # +notma: the path of a card before Hopper (no TMA: the GEGLU kernel that loads through pointers); this mode
        fused._tma_runs_on = (lambda device: False) if "notma" in options else tma_runs_on
        if "notma" in options:
            note = f"{note}; no TMA: the pointer-load GEGLU kernel".lstrip("; ")
        if args.vae_frame_chunk:
            pipe.vae.spatial_frame_chunk = args.vae_frame_chunk
            note = f"vae frame chunk {args.vae_frame_chunk}"
        parallel = next((o for o in options if o.startswith("parallel")), None)
        if parallel:  # exact: the uncond half of every guided step on a second GPU; nograph, 1thread: their A/B
            pipe.enable_guidance_parallel("cuda:1")
            pipe._step.graphs = parallel == "parallel" and base != "compiled"
            pipe._step._worker = None if parallel == "parallel1thread" else pipe._step._worker
            how = "CUDA graphs" if pipe._step.graphs else f"{1 if pipe._step._worker is None else 2} host thread(s)"
            note = f"{note}; guidance halves on cuda:0 + cuda:1, {how}".lstrip("; ")
        if base == "compiled":
            pipe.compile(mode=args.compile_mode, cache_dir=args.compile_cache)
        kw = dict(call_kw, guidance_reuse=reuse)
        if base.startswith("low-memory"):
            kw.pop("decode_chunk_size")
        if base in ("offload", "sequential"):
            kw["decode_chunk_size"] = 2
        sync()
        t0 = time.perf_counter()
        pipe(img, num_inference_steps=2, generator=gen(), **kw)  # warm-up (compiles in compiled mode)
        sync()
        warm = time.perf_counter() - t0
        # The first call's extra work: compiling, capturing the guidance halves' graphs, loading kernels
        what = ", compile" if base == "compiled" else ", graph capture" if parallel and pipe._step.graphs else ""
        note = f"{note}; first call (2 steps{what}) {warm:.1f}s".lstrip("; ")
        dec: list = []
        timed_call(pipe, "_decode_videos", dec)
        enc: list = []  # the work before the loop, for the time outside steps and decode
        timed_call(pipe, "_encode", enc)
        timed_call(pipe.image_encoder, "forward", enc)

        def hook(ev, pipe=pipe):
            pipe._step = ev.wrap(pipe._step)
            pipe._reuse_steps = tuple(ev.wrap(s) for s in pipe._reuse_steps)

        def call(pipe=pipe, kw=kw, segments=segments) -> np.ndarray:
            if segments == 1:
                return pipe(img, num_inference_steps=STEPS, generator=gen(), **kw).frames
            g, pt = gen(), dict(kw, output_type="pt")  # one generator through the chain, as the CLI
            video = chain_segments(
                lambda im: pipe(im, num_inference_steps=STEPS, generator=g, **pt).frames[0], img, segments
            )
            return video.float().permute(0, 2, 3, 1).numpy()[None]  # (1, N*(F-1)+1, H, W, 3), output "np"'s form

        if segments > 1:
            note = f"{note}; {segments} segments, {segments * (F - 1) + 1} frames; PSNR of the first".lstrip("; ")
        frames = run_video(
            f"img2vid {mode}",
            call,
            hook,
            dec,
            note,
            mean_step=reuse > 1,  # full and conditional-only steps alternate
        )
        if len(enc) >= 2:
            log(f"[img2vid {mode}] CLIP {enc[-2]:.3f}s  VAE encode {enc[-1]:.3f}s (synced; last video)")
        row = ROWS[-1]
        if parallel:
            # A CUDA graph's activations stay in its own pool (reserved) and are not allocated again at replay
            r0, r1 = (torch.cuda.max_memory_reserved(i) / 2**30 for i in (0, 1))
            peak1 = torch.cuda.max_memory_allocated(1) / 2**30
            row["note"] += f"; cuda:1 peak {peak1:.2f} GiB; reserved cuda:0 {r0:.2f}, cuda:1 {r1:.2f} GiB"
        if "video" in ref:
            row["psnr"] = psnr(frames[:, :F], ref["video"])  # a chain's first segment is the plain video
        if mode == base:
            exact_video[base] = frames
        elif exact_video:  # the same base mode's exact video, else any exact one (they agree to ~70 dB)
            row["psnr_exact"] = psnr(frames[:, :F], exact_video.get(base, next(iter(exact_video.values()))))
        if base in ("eager", "compiled") and reuse == 1 and "unet" in ref:  # the models on the GPU, called directly
            with torch.no_grad():
                x, t, emb, ids = ref["unet_in"]
                out = pipe.unet(x, t, emb, ids).sample.float().cpu()
                row["unet_rel"] = rel(out, ref["unet"])
                row["vae_rel"] = rel(pipe._decode(ref["vae_in"], DCS).float().cpu(), ref["vae"])
        if flops is None and mode == "eager":  # exact eager: the FLOPs of the function itself
            from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

            # The temporal convs run as img2vid's own op, which the counter cannot see: count it as the (3,1,1)
            # conv it is (3*C inputs per output, the zero-padded ends included, as a Conv3d is counted).
            @register_flop_formula(torch.ops.img2vid.frame_window_conv)
            def _window_flops(frames_shape, weight_shape, bias_shape, out_shape=None, **kw) -> int:
                b, f, _, p = frames_shape
                return 2 * b * f * p * weight_shape[0] * weight_shape[1]

            @register_flop_formula(torch.ops.img2vid.geglu_linear)
            def _geglu_flops(x_shape, weight_shape, bias_shape, out_shape=None, **kw) -> int:
                return 2 * x_shape[0] * x_shape[1] * weight_shape[0]

            # The frame attention as SDPA is counted: two (F x D) x (D x F)-sized products per (pixel, head)
            @register_flop_formula(torch.ops.img2vid.frame_attention)
            def _frame_flops(q_shape, k_shape, v_shape, heads, frames, out_shape=None, **kw) -> int:
                bf, n, inner = q_shape
                return 4 * bf * n * inner * frames

            x, t, emb, ids = unet_inputs(CFG.unet.in_channels, CFG.unet.cross_attention_dim[0])
            fc = FlopCounterMode(display=False)
            with fc, torch.no_grad():
                pipe.unet(x, t, emb, ids)
            flops = fc.get_total_flops()
            log(f"UNet step FLOPs (batch 2 x {F} frames): {flops / 1e12:.2f} TFLOP")
        del pipe
        free()

    if args.load:
        load_rows(state)
    table(flops)


def load_rows(state) -> None:
    import img2vid.checkpoint as ck

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as tmp:
        d = args.save_folder or tmp
        ck.save_folder(__import__("pathlib").Path(d), CFG, state, variant="fp16")
        for attempt in ("first", "warm"):
            sync()
            t0 = time.perf_counter()
            p = Pipeline.from_pretrained(d, torch_dtype=DT, variant="fp16", device=DEV)
            sync()
            dt = time.perf_counter() - t0
            same = all(  # the fp16 variant read back as DT
                torch.equal(v.cpu(), state[c][k].half().to(v.dtype))
                for c in state
                for k, v in getattr(p, c).state_dict().items()
            )
            log(f"[load {attempt}] every tensor equals the saved one: {same}")
            ROWS.append(dict(mode=f"load fp16 folder -> {DEV.type} ({attempt})", video=dt, note="from_pretrained"))
            log(f"[load {attempt}] {dt:.2f}s")
            del p
            free()


def table(flops: float | None) -> None:
    def f(x, fmt="{:.3f}"):
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)

    log("")
    log(
        "| mode | video s | UNet s/step | TFLOP/s | VAE decode s | peak GiB "
        "| UNet rel err | VAE rel err | PSNR dB | PSNR vs exact dB | note |"
    )
    log("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in ROWS:
        tf = flops / r["step"] / 1e12 if flops and r.get("step") and not math.isnan(r["step"]) else None
        log(
            f"| {r['mode']} | {f(r.get('video'), '{:.2f}')} | {f(r.get('step'))} | {f(tf, '{:.0f}')} | "
            f"{f(r.get('decode'))} | {f(r.get('peak'), '{:.2f}')} | {f(r.get('unet_rel'), '{:.1e}')} | "
            f"{f(r.get('vae_rel'), '{:.1e}')} | {f(r.get('psnr'), '{:.1f}')} | {f(r.get('psnr_exact'), '{:.1f}')} | "
            f"{r.get('note', '')} |"
        )


if __name__ == "__main__":
    main()
