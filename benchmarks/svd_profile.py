#!/usr/bin/env python3
"""Where the time goes: kernel breakdown of one SVD-XT UNet step and one VAE decode, plus micro-benchmarks of the
candidate replacements (SDPA backends per attention shape, the (3,1,1) temporal conv written several ways).

    python benchmarks/svd_profile.py                      # eager profiles + micro-benchmarks (no compile)
    python benchmarks/svd_profile.py --compiled           # also the compiled step and decoder (minutes of compiling)
    python benchmarks/svd_profile.py --tiny               # logic check on the CPU

Random full-size weights, fp16, batch 2 x 25 frames at 576x1024 (latents 72x128). Prints short tables; the full
profiler tables go to $OUT/profile_*.txt.
"""

# Each micro-benchmark closure is timed inside the loop iteration that defines it, so late binding is harmless.
# ruff: noqa: B023

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from bench_utils import median_event_ms, unfuse_geglu  # noqa: E402

from img2vid.configs import preset  # noqa: E402
from img2vid.layers import channels_last_, temporal_conv  # noqa: E402
from img2vid.unet import UNet  # noqa: E402
from img2vid.vae import VAE  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--tiny", action="store_true")
ap.add_argument("--compiled", action="store_true", help="profile the compiled UNet step and decoder too")
ap.add_argument("--unfused-too", action="store_true", help="with --compiled: also without the fused GEGLU kernel")
ap.add_argument("--skip", default="", help="comma list of parts to skip: micro, unet, vae")
ap.add_argument("--lowmem-only", action="store_true")
ap.add_argument("--nchw", action="store_true", help="eager parts with NCHW activations (the pipeline lays them out)")
ap.add_argument("--out", default=os.environ.get("OUT", "."))
args = ap.parse_args()
os.makedirs(args.out, exist_ok=True)

DEV = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
DT = torch.float16 if DEV.type == "cuda" else torch.float32
CFG = preset("tiny" if args.tiny else "svd-xt")
LH, LW = (16, 24) if args.tiny else (72, 128)
NF = CFG.num_frames
SKIP = set(args.skip.split(","))


def log(*a: object) -> None:
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    with open(os.path.join(args.out, "profile_summary.txt"), "a") as f:
        f.write(s + "\n")


def bench(fn: Callable[[], object], reps: int = 10) -> float:
    """Median seconds of fn() over reps, CUDA events, after two warm-ups."""
    for _ in range(2):
        fn()
    if DEV.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return median_event_ms(fn, reps) / 1e3


def category(name: str) -> str:
    """A GPU kernel's kind, from its name. Inductor's Triton kernels first: their names list the ops they fused
    ("triton_poi_fused_add_convolution_silu_..." is a pointwise kernel, not a convolution)."""
    n = name.lower()
    if n.startswith(("triton_per", "triton_red")):
        return "norm/reduce"
    if n.startswith("triton_poi"):
        return "elementwise/other"
    if "geglu" in n:
        return "gemm"
    if n.startswith(("gn_stats", "gn_finish")):  # img2vid's eager GroupNorm (norm_act)
        return "norm/reduce"
    if n.startswith(("gn_apply", "conv_epilogue")):
        return "elementwise/other"
    if "flash" in n or "fmha" in n or "attention" in n or "cudnn_generated_fort_native_sdpa" in n or "sdpa" in n:
        return "attention"
    if "conv" in n or "implicit" in n or "xmma_fprop" in n or "sm90_xmma" in n or "fprop" in n or "dgrad" in n:
        return "conv"
    if "gemm" in n or "cutlass" in n or "nvjet" in n or "matmul" in n or "sm90" in n:
        return "gemm"
    if "norm" in n or "welford" in n or "var_mean" in n or "reduce" in n or "red_" in n or "rowwisemoments" in n:
        return "norm/reduce"
    if "copy" in n or "cat" in n or "transpose" in n or "permute" in n or "nchw" in n or "nhwc" in n:
        return "copy/layout"
    return "elementwise/other"


def profile(name: str, fn: Callable[[], object]) -> None:
    """Kernel time by category and the top kernels of one call of fn (after a warm-up)."""
    fn()
    if DEV.type == "cuda":
        torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV.type == "cuda" else [])
    t0 = time.perf_counter()
    with prof(activities=acts) as p:
        fn()
        if DEV.type == "cuda":
            torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    ev = p.key_averages()
    with open(os.path.join(args.out, f"profile_{name}.txt"), "w") as f:
        f.write(ev.table(sort_by="self_cuda_time_total" if DEV.type == "cuda" else "self_cpu_time_total", row_limit=80))
    if DEV.type != "cuda":
        log(f"[{name}] cpu wall {wall:.3f}s (kernel breakdown needs a GPU)")
        return
    # Kernels only, each once: the device-side events (key_averages also lists a Triton kernel or a custom op under
    # its launching op's name, with the same device time, and "Command Buffer Full" is a wait).
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in p.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[e.name][0] += e.device_time_total
            per_kernel[e.name][1] += 1
    kern = [(k, t, int(n)) for k, (t, n) in per_kernel.items()]
    total = sum(k[1] for k in kern) / 1e6
    cats: dict[str, float] = defaultdict(float)
    for k, t, _ in kern:
        cats[category(k)] += t / 1e6
    log(f"[{name}] wall {wall:.3f}s, GPU kernel time {total:.3f}s")
    for c, t in sorted(cats.items(), key=lambda x: -x[1]):
        log(f"    {c:20s} {t * 1e3:8.1f} ms  {100 * t / total:5.1f}%")
    for k, t, n in sorted(kern, key=lambda x: -x[1])[:40]:
        log(f"    {t / 1e3:8.1f} ms  x{n:<5d} {k[:110]}")


def micro() -> None:
    log("== SDPA backends per attention shape (ms per call) ==")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b = 2 * NF
    shapes = [  # (name, batch, heads, L, D) as the UNet makes them; q/k/v are (B, L, H*D) projections
        ("spatial L1", b, 5, LH * LW, 64),
        ("spatial L2", b, 10, LH * LW // 4, 64),
        ("spatial L3", b, 20, LH * LW // 16, 64),
        ("temporal L1", 2 * LH * LW, 5, NF, 64),
        ("temporal L2", 2 * LH * LW // 4, 10, NF, 64),
        ("temporal L3", 2 * LH * LW // 16, 20, NF, 64),
        ("vae mid 1 head", 8, 1, LH * LW, 512),
    ]
    backends = [
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("math", SDPBackend.MATH),
    ]
    for name, n, h, seq, d in shapes:
        qkv = torch.randn(n, seq, 3, h * d, device=DEV, dtype=DT)
        q, k, v = (qkv[:, :, i].view(n, seq, h, d).transpose(1, 2) for i in range(3))
        ref = None
        row = []
        for bname, be in backends:
            if DEV.type == "cpu" and be != SDPBackend.MATH:
                continue
            if bname == "math" and seq * seq * n * h > 2**31:
                row.append(f"{bname} -")
                continue
            try:
                with sdpa_kernel([be]):
                    out = F.scaled_dot_product_attention(q, k, v)
                    t = bench(lambda: F.scaled_dot_product_attention(q, k, v))
                if ref is None:
                    ref = out.float()
                err = ((out.float() - ref).norm() / ref.norm()).item()
                tf = 4 * n * h * seq * seq * d / t / 1e12
                row.append(f"{bname} {t * 1e3:.2f} ({tf:.0f} TF/s, err {err:.0e})")
            except Exception as e:  # noqa: BLE001
                row.append(f"{bname} n/a ({str(e).splitlines()[0][:40]})")
        log(f"  {name:16s} [{n}x{h}x{seq}x{d}]: " + "; ".join(row))

    log("== (3,1,1) temporal conv, several ways (ms per call); 'window' is img2vid's layers.temporal_conv ==")
    cases = [
        ("unet L1", 2, 320, NF, LH, LW),
        ("unet L2", 2, 640, NF, LH // 2, LW // 2),
        ("unet L3", 2, 1280, NF, LH // 4, LW // 4),
        ("vae 512@72x128", 1, 512, 8, LH, LW),
        ("vae 512@144x256", 1, 512, 8, LH * 2, LW * 2),
        ("vae 256@288x512", 1, 256, 8, LH * 4, LW * 4),
        ("vae 128@576x1024", 1, 128, 8, LH * 8, LW * 8),
    ]
    for name, bb, c, f, h, w in cases:
        frames = torch.randn(bb * f, c, h, w, device=DEV, dtype=DT)  # (B*F, C, H, W) as the nets hold them
        conv = torch.nn.Conv3d(c, c, (3, 1, 1), padding=(1, 0, 0)).to(DEV, DT)
        x5 = frames.unflatten(0, (bb, f)).transpose(1, 2)  # (B, C, F, H, W) view

        def v_conv3d() -> torch.Tensor:
            return conv(x5)

        def v_conv3d_contig() -> torch.Tensor:
            return conv(x5.contiguous())

        w2 = conv.weight.view(c, c, 3, 1)

        def v_conv2d() -> torch.Tensor:
            # (B, C, F, H*W) view of the frames; a (3, 1) kernel over (F, H*W)
            return F.conv2d(x5.flatten(3), w2, conv.bias, padding=(1, 0)).unflatten(3, (h, w))

        wk = conv.weight[:, :, :, 0, 0].permute(2, 0, 1).contiguous()  # (3, Cout, Cin)

        def v_gemm() -> torch.Tensor:
            # frames (B, F, C, HW): out[f] = W0 x[f-1] + W1 x[f] + W2 x[f+1] + bias, zero frames at the ends
            xf = frames.view(bb, f, c, h * w)
            out = torch.matmul(wk[1], xf) + conv.bias[:, None]
            out[:, 1:] += torch.matmul(wk[0], xf[:, :-1])
            out[:, :-1] += torch.matmul(wk[2], xf[:, 1:])
            return out.view(bb, f, c, h, w).transpose(1, 2)

        wcat = conv.weight[:, :, :, 0, 0].permute(0, 2, 1).reshape(c, 3 * c)  # (Cout, 3*Cin), tap-major

        def v_gemm_cat() -> torch.Tensor:
            xf = frames.view(bb, f, c, h * w)
            xp = F.pad(xf, (0, 0, 0, 0, 1, 1))  # (B, F+2, C, HW)
            x3 = torch.cat([xp[:, :-2], xp[:, 1:-1], xp[:, 2:]], dim=2)  # (B, F, 3C, HW)
            return (torch.matmul(wcat, x3) + conv.bias[:, None]).view(bb, f, c, h, w).transpose(1, 2)

        def v_window() -> torch.Tensor:
            return temporal_conv(x5, conv)

        ref = v_conv3d().float()
        row = []
        for vname, fn in (
            ("window", v_window),
            ("conv3d(view)", v_conv3d),
            ("conv3d(contig)", v_conv3d_contig),
            ("conv2d(3,1)", v_conv2d),
            ("3 gemms", v_gemm),
            ("cat+gemm", v_gemm_cat),
        ):
            try:
                out = fn().float()
                err = ((out - ref).norm() / ref.norm()).item()
                t = bench(fn)
                row.append(f"{vname} {t * 1e3:.2f} (err {err:.0e})")
            except Exception as e:  # noqa: BLE001
                row.append(f"{vname} n/a ({str(e).splitlines()[0][:40]})")
        flops = 2 * bb * f * h * w * c * c * 3
        log(f"  {name:18s} ({flops / 1e12:.2f} TFLOP): " + "; ".join(row))
        if DEV.type == "cuda":
            torch.cuda.empty_cache()

    log("== GroupNorm+SiLU over frames (ms per call) ==")
    for name, n, c, h, w in (("unet L1", 2 * NF, 320, LH, LW), ("vae 128@576x1024", 8, 128, LH * 8, LW * 8)):
        x = torch.randn(n, c, h, w, device=DEV, dtype=DT)
        gn = torch.nn.GroupNorm(32, c, eps=1e-6).to(DEV, DT)
        t1 = bench(lambda: F.silu(gn(x)))
        xc = x.contiguous(memory_format=torch.channels_last)
        t2 = bench(lambda: F.silu(gn(xc)))
        floor = 4 * x.numel() / 3.0e12 * 1e3
        log(f"  {name}: NCHW {t1 * 1e3:.2f} ms, channels_last {t2 * 1e3:.2f} ms (bytes floor {floor:.2f} ms)")


def eager_layout(module: torch.nn.Module) -> None:
    """Channels-last conv weights where the pipeline's eager runs use them (`Pipeline._fit_layout`), unless --nchw."""
    from img2vid import fused

    if DEV.type == "cuda" and not args.nchw and fused._kernels_run_on(DEV):
        channels_last_(module)


def unet_part() -> None:
    torch.manual_seed(0)
    with torch.device(DEV):
        unet = UNet(CFG.unet).to(DT).eval()
    # frozen, as Pipeline holds them: ATen's matmul copies operands for a weight gradient otherwise (runs 76-77)
    unet.requires_grad_(False)
    eager_layout(unet)
    x = torch.randn(2, NF, CFG.unet.in_channels, LH, LW, device=DEV, dtype=DT)
    t = torch.tensor(0.3, device=DEV)
    emb = torch.randn(2, 1, CFG.unet.cross_attention_dim[0], device=DEV, dtype=DT)
    ids = torch.tensor([[6.0, 127.0, 0.02]] * 2, device=DEV, dtype=DT)

    @torch.no_grad()
    def step() -> torch.Tensor:
        return unet(x, t, emb, ids, return_dict=False)[0]

    base = 0
    if DEV.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    log(f"== UNet step eager: {bench(step, 5):.3f} s ==")
    if DEV.type == "cuda":
        log(f"   activation peak {(torch.cuda.max_memory_allocated() - base) / 2**30:.2f} GiB over weights")
    profile("unet_eager", step)
    if args.compiled:
        unet.to_channels_last()  # as Pipeline.compile() does by default (the eager pipeline keeps NCHW)
        compiled_step(step, base)
        if args.unfused_too:  # A/B of the fused GEGLU kernel (fused.geglu_linear) in the compiled step
            unfuse_geglu(unet)
            log("-- GEGLU unfused --")
            torch._dynamo.reset()
            compiled_step(step, base, "_unfused")


def compiled_step(step: Callable[[], torch.Tensor], base: int, tag: str = "") -> None:
    """Compile the UNet step, time it and profile it; tag names the variant in the logs and files."""
    cstep = torch.compile(step, fullgraph=True, dynamic=False)
    t0 = time.perf_counter()
    cstep()
    log(f"   compile {time.perf_counter() - t0:.0f}s")
    if DEV.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    log(f"== UNet step compiled{tag}: {bench(cstep, 5):.3f} s ==")
    if DEV.type == "cuda":
        log(f"   activation peak {(torch.cuda.max_memory_allocated() - base) / 2**30:.2f} GiB over weights")
    profile(f"unet_compiled{tag}", cstep)


def vae_part() -> None:
    torch.manual_seed(0)
    with torch.device(DEV):
        vae = VAE(CFG.vae).to(DT).eval()
    vae.requires_grad_(False)
    eager_layout(vae.decoder)
    n = 8
    z = torch.randn(n, 4, LH, LW, device=DEV, dtype=DT)
    for chunk in (None, 4, 2):
        vae.spatial_frame_chunk = chunk

        @torch.no_grad()
        def dec() -> torch.Tensor:
            return vae.decode_frames(z, n)

        if DEV.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t = bench(dec, 3)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if DEV.type == "cuda" else float("nan")
        log(f"== VAE decode {n} frames eager, frame chunk {chunk}: {t:.3f} s, activation peak {peak:.2f} GiB ==")
    vae.spatial_frame_chunk = 2  # as the pipeline decodes
    profile("vae_eager", lambda: vae.decode_frames(z, n))
    if args.compiled:  # as Pipeline.compile() runs the decoder: channels-last, compiled block by block
        from img2vid.compiled import compile_decoder

        channels_last_(vae.decoder)
        dec = compile_decoder(vae)
        log(f"== VAE decode {n} frames compiled, frame chunk 2: {bench(lambda: dec(z, n), 3):.3f} s ==")
        profile("vae_compiled", lambda: dec(z, n))


def pipe_part() -> None:
    """Whole-pipeline memory and speed for eager default and low-memory with several resident budgets."""
    import numpy as np
    import PIL.Image

    from img2vid import Pipeline

    h, w = LH * 8, LW * 8
    img = PIL.Image.fromarray((np.random.RandomState(0).rand(h, w, 3) * 255).astype(np.uint8))
    steps = 4
    with torch.device(DEV):
        pipe = Pipeline.from_config(CFG, torch_dtype=DT)
    pipe.set_progress_bar_config(disable=True)
    parts = ("unet", "vae", "image_encoder")
    state = {k: {n: t.cpu() for n, t in getattr(pipe, k).state_dict().items()} for k in parts}

    def run(label: str, p: Pipeline, **kw: object) -> None:
        times: list = []
        orig = p._step

        def timed(*a: object, **k: object) -> torch.Tensor:
            s = torch.cuda.Event(enable_timing=True) if DEV.type == "cuda" else None
            if s is not None:
                s.record()
            r = orig(*a, **k)
            if s is not None:
                e = torch.cuda.Event(enable_timing=True)
                e.record()
                times.append((s, e))
            return r

        p._step = timed
        dec: list = []
        orig_dec = p._decode_videos

        def timed_dec(*a: object, **k: object) -> torch.Tensor:
            if DEV.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            r = orig_dec(*a, **k)
            if DEV.type == "cuda":
                torch.cuda.synchronize()
            dec.append(time.perf_counter() - t0)
            return r

        p._decode_videos = timed_dec
        p(img, num_inference_steps=2, height=h, width=w, output_type="np", **kw)  # warm-up
        times.clear()
        dec.clear()
        if DEV.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        p(img, num_inference_steps=steps, height=h, width=w, output_type="np", **kw)
        wall = time.perf_counter() - t0
        if DEV.type == "cuda":
            st = sorted(a.elapsed_time(b) / 1e3 for a, b in times)[len(times) // 2]
            peak = torch.cuda.max_memory_allocated() / 2**30
        else:
            st, peak = float("nan"), float("nan")
        log(f"  {label:38s} step {st:.3f}s decode {dec[-1]:.3f}s video({steps} steps) {wall:.2f}s peak {peak:.2f} GiB")

    log("== whole pipeline (4 steps) ==")
    pipe.to(DEV)
    if not args.lowmem_only:
        run("eager default (decode chunk 8)", pipe, decode_chunk_size=8)
    del pipe

    def split(p: Pipeline) -> None:
        p.to(DEV)
        p._split_guidance = True

    def chunk(p: Pipeline) -> None:
        p.to(DEV)
        p.unet.enable_forward_chunking(5)

    variants = (
        {}
        if args.lowmem_only
        else {
            "eager + split guidance": split,
            "eager + forward chunking 5": chunk,
            "sequential offload only": lambda p: p.enable_sequential_cpu_offload(device=DEV),
        }
    )
    for sp in (True, False):
        variants[f"low-memory{'' if sp else ' nosplit'}"] = lambda p, sp=sp: p.enable_low_memory(
            device=DEV, split_guidance=sp
        )
    profiled = False
    for label, setup in variants.items():
        if DEV.type == "cuda":
            torch.cuda.empty_cache()
        p = Pipeline.from_state_dicts(CFG, {c: dict(sd) for c, sd in state.items()})
        p.set_progress_bar_config(disable=True)
        setup(p)
        run(label, p, **({"decode_chunk_size": 8} if "low-memory" not in label else {}))
        if label.startswith("low-memory") and not profiled and not args.lowmem_only:
            profiled = True
            profile("lowmem_step", lambda p=p: p(img, num_inference_steps=1, height=h, width=w, output_type="latent"))
        del p


def main() -> None:
    log("=" * 80)
    if DEV.type == "cuda":
        log(f"{torch.cuda.get_device_name(0)} torch {torch.__version__} {time.strftime('%Y-%m-%d %H:%M')}")
        a = torch.randn(8192, 8192, device=DEV, dtype=DT)
        t = bench(lambda: a @ a)
        log(f"fp16 8192^3 matmul: {2 * 8192**3 / t / 1e12:.0f} TFLOP/s")
        big = torch.empty(2**30, device=DEV, dtype=torch.uint8)
        t = bench(lambda: big.clone())
        log(f"1 GiB copy: {2 * 2**30 / t / 1e12:.2f} TB/s")
        host = torch.empty(2**28, dtype=torch.uint8).pin_memory()
        t = bench(lambda: big[: 2**28].copy_(host, non_blocking=True))
        log(f"256 MiB pinned host->device: {2**28 / t / 1e9:.1f} GB/s")
        del a, big
    with torch.no_grad():
        if "micro" not in SKIP:
            micro()
        if "unet" not in SKIP:
            unet_part()
        if "vae" not in SKIP:
            vae_part()
    if "pipe" not in SKIP:
        pipe_part()


if __name__ == "__main__":
    main()
