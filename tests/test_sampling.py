"""The sampler's pure functions against diffusers' EulerDiscreteScheduler as SVD configures it."""

from __future__ import annotations

import pytest
import torch
from conftest import reference_scheduler, rel_err

from img2vid import sampling


@pytest.mark.parametrize("steps", [1, 2, 7, 25, 30])
def test_karras_sigmas_and_timesteps_are_bit_identical(steps):
    ref = reference_scheduler()
    ref.set_timesteps(steps)
    sig = sampling.karras_sigmas(steps)
    assert torch.equal(sig, ref.sigmas)
    assert torch.equal(sampling.c_noise(sig[:-1]), ref.timesteps)
    assert sampling.init_noise_sigma(sig).item() == pytest.approx(float(ref.init_noise_sigma), rel=1e-7)


def test_custom_sigmas_used_as_given():
    ref = reference_scheduler()
    given = [700.0, 50.0, 3.0, 0.3, 0.0]
    ref.set_timesteps(sigmas=given)
    sig = sampling.custom_sigmas(given)
    assert torch.equal(sig, ref.sigmas)
    assert torch.equal(sampling.c_noise(sig[:-1]), ref.timesteps)
    with pytest.raises(ValueError):
        sampling.custom_sigmas([1.0])
    with pytest.raises(ValueError):
        sampling.custom_sigmas([5.0, -1.0, 0.0])


def test_schedule_takes_given_sigmas_over_the_step_count():
    # diffusers ignores num_inference_steps when sigmas are given; without them it is Karras' schedule
    given = [700.0, 50.0, 3.0, 0.3, 0.0]
    assert torch.equal(sampling.schedule(25, 0.002, 700.0, 7.0, given), sampling.custom_sigmas(given))
    assert torch.equal(sampling.schedule(7, 0.002, 700.0, 7.0, None), sampling.karras_sigmas(7, 0.002, 700.0, 7.0))
    assert sampling.schedule(3, 0.1, 10.0, 7.0, None)[0].item() == pytest.approx(10.0)
    with pytest.raises(ValueError, match="at least two"):
        sampling.schedule(25, 0.002, 700.0, 7.0, [1.0])


def test_scaling_and_euler_step_match_scheduler():
    ref = reference_scheduler()
    ref.set_timesteps(4)
    sig = sampling.karras_sigmas(4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 5, 6, generator=g) * sig[0]
    for i in range(4):
        t = ref.timesteps[i]
        scaled_ref = ref.scale_model_input(x, t)
        assert rel_err(sampling.scale_input(x, sig[i]), scaled_ref) < 1e-6
        v = torch.randn(x.shape, generator=g)
        ours = sampling.euler_step(x, v, sig[i], sig[i + 1])
        x = ref.step(v, t, x).prev_sample
        assert rel_err(ours, x) < 1e-6


def test_per_frame_guidance():
    g = sampling.guidance_scales(1.0, 3.0, 5)
    assert torch.allclose(g, torch.tensor([1.0, 1.5, 2.0, 2.5, 3.0]))
    u, c = torch.zeros(1, 5, 1, 1, 1), torch.ones(1, 5, 1, 1, 1)
    out = sampling.apply_guidance(u, c, g.view(1, 5, 1, 1, 1))
    assert torch.allclose(out.flatten(), g)


def test_guidance_from_delta_is_guidance_along_a_given_direction():
    """Guidance reuse's approximate step guides with a delta kept from another step; given this step's delta it is
    exactly apply_guidance (bit for bit on dyadic values, where every op is exact; to rounding on any floats)."""
    gen = torch.Generator().manual_seed(0)
    g = sampling.guidance_scales(1.0, 3.0, 5).view(1, 5, 1, 1, 1)
    u = torch.randint(-64, 64, (2, 5, 4, 3, 3), generator=gen).float() / 8
    c = torch.randint(-64, 64, (2, 5, 4, 3, 3), generator=gen).float() / 8
    assert torch.equal(sampling.guidance_from_delta(c, c - u, g), sampling.apply_guidance(u, c, g))
    u, c = torch.randn(2, 5, 4, 3, 3, generator=gen), torch.randn(2, 5, 4, 3, 3, generator=gen)
    torch.testing.assert_close(sampling.guidance_from_delta(c, c - u, g), sampling.apply_guidance(u, c, g))
    # frame 0 has scale 1: no guidance, whatever the delta
    assert torch.equal(sampling.guidance_from_delta(c, torch.randn(c.shape, generator=gen), g)[:, 0], c[:, 0])


def test_schedule_takes_sigmas_as_a_tensor_refuses_none_given_and_uses_rho() -> None:
    """Sigmas given as a tensor are used as given (a truth test of a tensor raises); an empty list is a schedule
    given, and refused, not silently Karras'; the Karras schedule is spaced with the rho asked for, not 7."""
    given = [700.0, 50.0, 3.0, 0.3, 0.0]
    assert torch.equal(sampling.schedule(25, 0.002, 700.0, 7.0, torch.tensor(given)), sampling.custom_sigmas(given))
    with pytest.raises(ValueError, match="at least two"):
        sampling.schedule(25, 0.002, 700.0, 7.0, [])
    rho3 = sampling.schedule(4, 0.002, 700.0, 3.0, None)
    assert torch.equal(rho3, sampling.karras_sigmas(4, 0.002, 700.0, 3.0))
    assert not torch.equal(rho3, sampling.karras_sigmas(4, 0.002, 700.0, 7.0))
