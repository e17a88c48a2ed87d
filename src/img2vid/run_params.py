"""One video run as both front ends take it: the ranges of its settings (one table, so `img2vid generate` and a
server request accept exactly the same values), the settings with the model's defaults filled in, and the run itself
(one call, or a chain of segments). Imports nothing heavy: the CLI parses with it before torch loads."""

from __future__ import annotations

import argparse
import dataclasses
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from img2vid import video_checks
from img2vid.configs import FLOAT16_MAX

if TYPE_CHECKING:
    import PIL.Image
    import torch

    from img2vid.inputs import ProgressFn
    from img2vid.pipeline import Pipeline

# The widest frame every encoder but WebP's takes; more fails as an overflow in Pillow or as an allocation of
# terabytes, not as a message about the size.
MAX_SIDE = video_checks.MAX_SIDE["mp4"]
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes up to this
# Setting -> (type, least, most). float16's range bounds the guidance scales: the pipeline refuses more, but a server
# request would learn it only once it has its turn.
LIMITS: dict[str, tuple[type, float, float | None]] = {
    "width": (int, 1, MAX_SIDE),
    "height": (int, 1, MAX_SIDE),
    "frames": (int, 1, 256),
    "segments": (int, 1, 64),  # longer videos: chained segments (img2vid.longer)
    "steps": (int, 1, 1000),
    "fps": (int, 1, 240),
    "motion_bucket_id": (int, 0, 1023),
    "noise_aug_strength": (float, 0, 10),
    "min_guidance": (float, 0, FLOAT16_MAX),
    "max_guidance": (float, 0, FLOAT16_MAX),
    "seed": (int, 0, MAX_SEED),
    "guidance_reuse": (int, 1, 1000),  # APPROXIMATE when > 1 (Pipeline.__call__'s guidance_reuse)
}


def number(kind: type, lo: float, hi: float | None = None) -> Callable[[str], Any]:
    """An argparse type: `kind` parsed from text and checked against lo..hi, so ranges fail before any loading."""

    def parse(text: str) -> Any:
        shown = text if len(text) <= 24 else f"{text[:12]}...({len(text)} characters)"  # a server echoes it
        try:
            value = kind(text)
        except ValueError:  # also int()'s refusal of over 4300 digits: a number, too long to be one we take
            what = "an integer" if kind is int else "a number"
            if text.isascii() and text.isdigit():
                raise argparse.ArgumentTypeError(f"{shown} is out of range {lo}..{'' if hi is None else hi}") from None
            raise argparse.ArgumentTypeError(f"expected {what}, got {shown!r}") from None
        # (isfinite of an int past float's range raises: ints are finite anyway)
        if (kind is float and not math.isfinite(value)) or value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{shown} is out of range {lo}..{'' if hi is None else hi}")
        return value

    return parse


def limited(name: str) -> Callable[[str], Any]:
    """The parser of one setting of LIMITS."""
    return number(*LIMITS[name])


def random_seed() -> int:
    """A seed when none is given: printed and stored with the video, so the run can be made again."""
    return secrets.randbelow(2**32)


@dataclass(frozen=True)
class RunParams:
    """What the pipeline is called with for one video (a segment's, in a chain); stored in the video's metadata
    under these names, which are the pipeline's (and diffusers') keyword arguments."""

    width: int
    height: int
    num_frames: int
    num_inference_steps: int
    min_guidance_scale: float
    max_guidance_scale: float
    fps: int
    motion_bucket_id: int
    noise_aug_strength: float
    decode_chunk_size: int
    guidance_reuse: int = 1

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def run_params(
    pipe: Pipeline,
    width: int,
    height: int,
    steps: int,
    min_guidance: float,
    max_guidance: float,
    noise_aug_strength: float,
    frames: int | None = None,
    fps: int | None = None,
    motion_bucket_id: int | None = None,
    decode_chunk_size: int | None = None,
    guidance_reuse: int = 1,
) -> RunParams:
    """The settings given, and for those not given the model's (frames, fps, motion bucket) and the pipeline's
    decode chunk (all frames at once unless a memory mode chose fewer)."""
    cfg = pipe.config
    frames = frames or cfg.num_frames
    return RunParams(
        width=width,
        height=height,
        num_frames=frames,
        num_inference_steps=steps,
        min_guidance_scale=min_guidance,
        max_guidance_scale=max_guidance,
        fps=fps or cfg.default_fps,
        motion_bucket_id=cfg.default_motion_bucket_id if motion_bucket_id is None else motion_bucket_id,
        noise_aug_strength=noise_aug_strength,
        decode_chunk_size=decode_chunk_size or min(pipe.default_decode_chunk_size or frames, frames),
        guidance_reuse=guidance_reuse,
    )


def sample_video(
    pipe: Pipeline,
    image: PIL.Image.Image | torch.Tensor,
    seed: int,
    run: RunParams,
    segments: int = 1,
    start: Callable[[int, int], None] | None = None,
    progress: ProgressFn | None = None,
) -> torch.Tensor:
    """One video's (F, 3, H, W) frames in [0, 1] as the pipeline returns them; with segments > 1 the chained
    (N*(F-1)+1, 3, H, W) on the CPU, one generator continuing from segment to segment (img2vid.longer).
    start(k, n) runs before segment k of n; progress is the pipeline's."""
    import torch

    from img2vid.longer import chain_segments

    generator = torch.Generator("cpu").manual_seed(seed)  # CPU noise: the same video on any device

    def segment(im: PIL.Image.Image | torch.Tensor) -> torch.Tensor:
        out = pipe(
            im,
            generator=generator,
            output_type="pt",
            progress=progress,
            height=run.height,
            width=run.width,
            num_frames=run.num_frames,
            num_inference_steps=run.num_inference_steps,
            min_guidance_scale=run.min_guidance_scale,
            max_guidance_scale=run.max_guidance_scale,
            fps=run.fps,
            motion_bucket_id=run.motion_bucket_id,
            noise_aug_strength=run.noise_aug_strength,
            decode_chunk_size=run.decode_chunk_size,
            guidance_reuse=run.guidance_reuse,
        )
        return out.frames[0]

    return chain_segments(segment, image, segments, start)  # one segment: the plain call's frames
