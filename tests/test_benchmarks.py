"""The benchmark scripts are deliverables too: their --tiny mode runs the same logic on the CPU in seconds (tiny
random model, diffusers as the oracle), so CI catches a script that no longer runs or no longer agrees."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import needs_triton

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, out: Path) -> str:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--tiny", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def test_speed_benchmark_table_and_agreement(tmp_path: Path) -> None:
    modes = "eager,low-memory,offload,sequential"
    out = _run("svd_speed.py", "--compare", "diffusers", "--modes", modes, "--load", out=tmp_path)
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.splitlines() if line.startswith("| ")}
    assert {"diffusers eager", "img2vid eager", "img2vid low-memory"} <= rows.keys()
    unet_rel, vae_rel, psnr = (float(rows["img2vid eager"][i]) for i in (5, 6, 7))
    assert unet_rel < 1e-4 and vae_rel < 1e-4 and psnr > 80  # float32 on the CPU: the same function
    for mode in ("low-memory", "offload", "sequential"):  # the memory recipes give diffusers' video too
        assert float(rows[f"img2vid {mode}"][7]) > 80, mode
    assert out.count("every tensor equals the saved one: True") == 2
    assert (tmp_path / "svd_speed.log").exists()


def test_speed_benchmark_refuses_bad_arguments(tmp_path: Path) -> None:
    # Any unknown name used to run diffusers' offload recipe under that name (a "none" row of offload's numbers)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "svd_speed.py"), "--tiny", "--out", str(tmp_path)]
        + ["--diffusers-modes", "eager,none"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown mode 'none'" in proc.stderr
    assert not (tmp_path / "svd_speed.log").exists()
    for size, needle in (("576", "takes WIDTHxHEIGHT"), ("100x64", "multiples of 64")):
        proc = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "svd_speed.py"), "--tiny", "--size", size],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr


def test_profile_script_runs(tmp_path: Path) -> None:
    out = _run("svd_profile.py", "--skip", "micro,pipe", out=tmp_path)
    assert "UNet step eager" in out and "VAE decode 8 frames eager" in out
    assert (tmp_path / "profile_summary.txt").exists()


def test_decode_variants_script_runs(tmp_path: Path) -> None:
    out = _run("svd_decode.py", "--variants", "nchw:2", out=tmp_path)
    row = next(line for line in out.splitlines() if line.startswith("| nchw:2 |"))
    assert float(row.split("|")[4]) < 1e-4  # float32 on the CPU: compiled blocks give the eager decode
    assert row in (tmp_path / "svd_decode.txt").read_text().splitlines()


@needs_triton
def test_kernels_script_runs(tmp_path: Path) -> None:
    out = _run("svd_kernels.py", out=tmp_path)  # --tiny: Triton's CPU interpreter, tiny shapes
    errs = [float(line.split("err ")[1].split(",")[0]) for line in out.splitlines() if "err " in line]
    assert len(errs) >= 4 and max(errs) < 1e-3
    assert (tmp_path / "svd_kernels.txt").read_text().splitlines() == out.splitlines()
