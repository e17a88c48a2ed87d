"""The EDM / Euler sampler of SVD as pure functions over tensors.

The UNet never sees the schedule: the pipeline turns sigmas into the UNet's inputs (scaled latents, c_noise) and its
v-prediction back into an Euler step. Everything here works on device tensors, so a compiled denoising step can take
sigma as a 0-dim tensor and never syncs with the host.

Numerics follow diffusers' EulerDiscreteScheduler as configured for SVD (Karras sigmas with rho 7 from sigma_max to
sigma_min, a final 0, continuous timesteps c_noise = 0.25 ln(sigma), the Euler update in float32).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def karras_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 700.0, rho: float = 7.0) -> torch.Tensor:
    """(num_steps + 1,) float32: Karras et al. (2022) eq. 5 spaced in sigma^(1/rho), then a final 0.

    Computed in float64 and rounded once to float32, as diffusers does with numpy, so both give the same bits.
    """
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be at least 1, got {num_steps}")
    ramp = (
        torch.linspace(0, 1, num_steps, dtype=torch.float64) if num_steps > 1 else torch.zeros(1, dtype=torch.float64)
    )
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def custom_sigmas(sigmas: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """A user's schedule, used exactly as given (its last entry is the final sigma, usually 0), as float32."""
    try:
        s = torch.as_tensor(sigmas, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"sigmas must be a sequence of numbers, got {sigmas!r}") from None
    if s.ndim != 1:  # a (2, 2) nest was flattened into one schedule
        raise ValueError(f"sigmas must be one-dimensional, got shape {tuple(s.shape)}")
    s = s.float()
    if s.numel() < 2:
        raise ValueError("sigmas needs at least two values (a start and a final sigma)")
    if not torch.isfinite(s).all() or (s[:-1] <= 0).any() or (s[-1] < 0):
        raise ValueError("sigmas must be finite, positive, with a final value >= 0")
    return s


def schedule(
    num_steps: int, sigma_min: float, sigma_max: float, rho: float, sigmas: Sequence[float] | torch.Tensor | None
) -> torch.Tensor:
    """A call's (S + 1,) float32 sigmas: the user's own `sigmas` (num_steps is then ignored, as diffusers ignores
    it), or else the Karras schedule of num_steps steps."""
    if sigmas is not None:
        return custom_sigmas(sigmas)
    return karras_sigmas(num_steps, sigma_min, sigma_max, rho)


def c_noise(sigma: torch.Tensor) -> torch.Tensor:
    """The UNet's timestep input for v-prediction EDM: 0.25 ln(sigma), same shape as sigma."""
    return 0.25 * sigma.log()


def init_noise_sigma(sigmas: torch.Tensor) -> torch.Tensor:
    """Scale of the initial Gaussian latents: sqrt(max(sigma)^2 + 1) (a variance-preserving x_T at sigma_max)."""
    m = sigmas.max()
    return (m**2 + 1) ** 0.5


def scale_input(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """c_in = 1 / sqrt(sigma^2 + 1): the UNet sees unit-variance inputs at every noise level."""
    return x / (sigma**2 + 1) ** 0.5


def guidance_scales(min_scale: float, max_scale: float, num_frames: int) -> torch.Tensor:
    """(num_frames,) float32: guidance grows linearly over the frames (the first frame is the input image, so it
    needs the least)."""
    return torch.linspace(min_scale, max_scale, num_frames)


def apply_guidance(uncond: torch.Tensor, cond: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """uncond, cond: (B, F, C, h, w); scale broadcastable, e.g. (B, F, 1, 1, 1)."""
    return uncond + scale * (cond - uncond)


def guidance_from_delta(cond: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """APPROXIMATE guidance for the steps of guidance reuse that skip the unconditional half: cond (B, F, C, h, w)
    from this step, delta = cond - uncond (same shape) kept from an earlier step, scale as in apply_guidance.

    Equal to apply_guidance(cond - delta, cond, scale) in exact arithmetic (uncond + s (cond - uncond) = cond +
    (s - 1) delta); the approximation is that delta comes from another sigma (FasterCache's CFG cache assumes the
    guidance direction changes slowly between neighbouring steps)."""
    return cond + (scale - 1) * delta


def denoised_from_v(v: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x0 = c_skip x + c_out v with c_skip = 1/(sigma^2+1), c_out = -sigma/sqrt(sigma^2+1) (v-prediction EDM)."""
    return v * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """One Euler step of the probability-flow ODE from sigma to sigma_next.

    Computed in float32 whatever the model's dtype (the update x + d*dt loses little bits in half precision at small
    sigma), then cast back to v's dtype so the next UNet call sees the model's dtype, as the reference does.
    """
    x32 = x.float()
    x0 = denoised_from_v(v.float(), x32, sigma)
    d = (x32 - x0) / sigma
    return (x32 + d * (sigma_next - sigma)).to(v.dtype)
