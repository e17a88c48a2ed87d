"""Longer videos than the model's 14 or 25 frames, by chaining segments, each started from the last frame before.

SVD was trained on a fixed number of frames, so asking one call for many more leaves what it learned. Chaining
stays inside it: generate a segment, condition the next one on that segment's LAST frame, and so on. SVD's first
frame reproduces its conditioning image, so every segment after the first drops its first frame (kept, it would
show as a stutter): N segments of F frames give N*(F-1)+1 frames. Each segment starts from a decoded frame rather
than the original image, so drift (colour, detail) grows with every segment, as with any last-frame chaining.

The function here only orchestrates: the caller closes over the pipeline and its arguments, and passes the same
random generator to every segment, which simply continues, so a seed still means the same long video.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from img2vid.errors import InputError
from img2vid.inputs import ImageInput, to_host

__all__ = ["chain_segments", "check_segments"]

# One pipeline call: a conditioning image in, that segment's (F, 3, H, W) frames in [0, 1] out, e.g.
# `lambda im: pipe(im, generator=g, output_type="pt").frames[0]`
SegmentFn = Callable[[ImageInput], torch.Tensor]


def check_segments(segments: int, frames: int | None = None) -> None:
    """A one-line InputError unless `segments` is an int >= 1 and, when chaining, each segment can add a frame
    (`frames` = frames per segment, None when not known yet). Front ends call it before any slow work."""
    # bool is an int subclass, but segments=True is surely a mistake
    if not isinstance(segments, int) or isinstance(segments, bool) or segments < 1:
        raise InputError(f"segments must be an integer >= 1, got {segments!r}")
    if segments > 1 and frames is not None and frames < 2:
        # a 1-frame segment is only its conditioning image again: after dropping it, nothing would be added
        raise InputError(f"{segments} segments need at least 2 frames per segment, got {frames}")


def chain_segments(
    segment: SegmentFn,
    image: ImageInput,
    segments: int,
    on_segment: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Run `segment` `segments` times, each on the previous segment's last frame -> (N*(F-1)+1, 3, H, W) on the CPU.

    segment(image) returns one segment's (F, 3, H, W) frames in [0, 1], on any device and float dtype; segment 1
    gets `image`, segment k > 1 the last frame of segment k-1 as a (3, H, W) float32 CPU tensor in [0, 1] (an image
    the pipeline accepts as it is). on_segment(k, n) is called before segment k starts (k = 1..n), e.g. to label
    progress bars. The result has the dtype `segment` returned. One segment is returned where `segment` left it,
    uncopied: it is the plain video, and no later segment needs its memory (an export rounds GPU frames to bytes
    on the GPU, a quarter of the bytes to copy).
    """
    check_segments(segments)
    video: torch.Tensor | None = None  # (N*(F-1)+1, 3, H, W) on the CPU, filled segment by segment
    filled = 0
    condition = image
    for k in range(1, segments + 1):
        if on_segment is not None:
            on_segment(k, segments)
        frames = segment(condition)
        if not isinstance(frames, torch.Tensor) or frames.ndim != 4 or frames.shape[1] != 3:
            got = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
            raise InputError(f"a segment must return (F, 3, H, W) frames (e.g. .frames[0]), got {got}")
        if video is not None and frames.shape[1:] != video.shape[1:]:
            raise InputError(f"segment {k} has frames of {tuple(frames.shape[1:])}, not {tuple(video.shape[1:])}")
        check_segments(segments, len(frames))  # F is known only now, from the first segment
        if segments == 1:
            return frames
        # To the CPU as soon as it is done: N segments on the GPU would hold N times a segment's memory
        frames = to_host(frames)
        # A copy: a segment that edits its input in place must not change frames already in the video
        condition = frames[-1].to(torch.float32, copy=True)  # (3, H, W)
        if video is None:  # allocated once: a list of segments joined at the end held the video twice
            video = frames.new_empty((segments * (len(frames) - 1) + 1, *frames.shape[1:]))
        elif len(frames) - 1 != (len(video) - 1) // segments:
            raise InputError(f"segment {k} has {len(frames)} frames, not {(len(video) - 1) // segments + 1}")
        new = frames if k == 1 else frames[1:]  # frame 0 of a later segment repeats `condition`
        video[filled : filled + len(new)] = new
        filled += len(new)
        del frames, new  # the segment's own memory goes before the next one is made
    return video  # (N*(F-1)+1, 3, H, W), every row filled
