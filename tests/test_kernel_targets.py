"""img2vid's Triton kernels build for the cards they are enabled on below Hopper (`fused.KERNELS_MIN_CAPABILITY`):
Ampere's sm_80 (A100) and sm_86 (RTX 30xx, A10, A40) and Ada's sm_89 (RTX 40xx, L4, L40), whose limits (shared
memory, instructions) differ from the H100 / H200 that the GPU tests run on. Built on the CPU: the kernels are
launched with SVD's shapes through their real launch code, with Triton's driver replaced by one that names no device
and a compile hook that takes each request instead of running it; each request is then compiled (to a cubin, through
Triton's ptxas) for each target. What this cannot prove is their speed on those cards (not measured: BENCHMARKS.md
has H100 and H200 numbers only)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from conftest import needs_triton

TARGETS = {
    80: 163 * 1024,
    86: 99 * 1024,
    89: 99 * 1024,
}  # compute capability -> the most shared memory a block may have there
KERNELS = {
    "gn_stats", "gn_finish", "gn_apply", "conv_epilogue_kernel", "gn_stats_nhwc", "gn_apply_nhwc",
    "conv_epilogue_nhwc", "time_mix_kernel", "add_norm_kernel", "frame_attention_kernel", "geglu_loads_kernel",
}  # fmt: skip

SCRIPT = textwrap.dedent(
    """
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from img2vid import add_norm, frame_kernel, fused, norm_act

    class NoDevice:  # what JITFunction.run asks of the driver before it compiles
        def get_current_device(self):
            return 0
        def get_current_stream(self, device):
            return 0
        def get_current_target(self):
            return GPUTarget("cuda", 80, 32)

    requests = {}
    def take(*, key, fn, compile, **_):
        requests.setdefault(str(key), (fn.jit_function, compile))
        return True  # compiled below, for each target; nothing runs

    triton.runtime.driver.set_active(NoDevice())
    triton.knobs.runtime.jit_cache_hook = take
    h = torch.float16
    with torch.no_grad():
        # (channels, pixels) of the UNet's levels (72 x 128 latents) and of the decoder's (up to 576 x 1024)
        for c, p in [(320, 9216), (640, 2304), (1280, 144), (512, 9216), (128, 576 * 1024)]:
            norm = torch.nn.GroupNorm(32, c).to(h)
            for channels_last in (False, True):
                x = torch.empty(1, c, p, dtype=h)
                if channels_last:
                    x = x.transpose(1, 2).contiguous().transpose(1, 2)  # (R, C, P) rows, (R, P, C) in memory
                norm_act.group_norm_rows(x, norm, 1, True, torch.empty(1, c, dtype=h))
                norm_act.group_norm_rows(x, norm, 1, False)
                norm_act.conv_epilogue(x, torch.empty(c, dtype=h), torch.empty_like(x))
        t = torch.empty(2, 320, 72, 128, dtype=h)
        norm_act.time_mix(torch.empty((), dtype=h), torch.empty((), dtype=h), t, t, torch.empty_like(t))
        for fmt in (torch.contiguous_format, torch.channels_last):  # with the temporal conv's bias, either layout
            t = torch.empty(2, 320, 72, 128, dtype=h).contiguous(memory_format=fmt)
            norm_act.time_mix(torch.empty((), dtype=h), torch.empty((), dtype=h), t, t, t, torch.empty(320, dtype=h))
        for c in (320, 640, 1280):
            x, w = torch.empty(256, c, dtype=h), torch.empty(c, dtype=h)
            add_norm.launch_add_norm(x, x, None, 1, False, w, w, 1e-5, torch.empty_like(x), torch.empty_like(x))
        for c in (320, 640, 1280):  # the GEGLU projections of SVD's levels: (M, C) -> (M, 4C) through (8C, C)
            x, w, b = torch.empty(256, c, dtype=h), torch.empty(8 * c, c, dtype=h), torch.empty(8 * c, dtype=h)
            fused.launch_geglu_loads(x, w, b, torch.empty(256, 4 * c, dtype=h))
        for frames in (25, 14):
            q = torch.empty(2 * frames, 64, 320, dtype=h)
            frame_kernel.launch_frame_attention(q, q, q, torch.empty_like(q), 5, frames)
    for fn, req in requests.values():
        options = {k: req[k] for k in ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion")}
        for cap in CAPS:
            src = ASTSource(fn, req["signature"], req["constants"], req["configs"][0])
            kernel = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=options)
            print(fn.fn.__name__, cap, kernel.metadata.shared, "cubin" in kernel.asm and len(kernel.asm["cubin"]) > 0)
    """
)


@needs_triton
def test_kernels_build_for_ampere_and_ada() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real compiles, not the interpreter
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT.replace("CAPS", repr(tuple(TARGETS)))],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.strip()]
    built: dict[str, set[int]] = {}
    for name, cap, shared, cubin in rows:
        assert cubin == "True", (name, cap)
        assert int(shared) <= TARGETS[int(cap)], (name, cap, shared)
        built.setdefault(name, set()).add(int(cap))
    assert set(built) == KERNELS  # every kernel that runs below Hopper was launched, and nothing else
    assert all(caps == set(TARGETS) for caps in built.values()), built
