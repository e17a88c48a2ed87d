"""diffusers' output containers (BaseOutput): what the pipeline, the UNet and the VAE return, so that scripts
written for diffusers read them as they do there (`.frames`, `.sample`, by key, by position, as a tuple)."""

from __future__ import annotations

from typing import Any

import torch


class FieldOutput(dict):
    """diffusers' BaseOutput for outputs of one field: an ordered mapping read by key (out["sample"]), by position
    (out[0], out[:1]) or as a tuple (out.to_tuple()); each subclass names its field as a property."""

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(self.values())

    def __getitem__(self, key: int | slice | str) -> Any:
        return dict.__getitem__(self, key) if isinstance(key, str) else self.to_tuple()[key]


class SampleOutput(FieldOutput):
    """diffusers' UNetSpatioTemporalConditionOutput and DecoderOutput: the tensor as out.sample, out["sample"] or
    out[0]."""

    def __init__(self, sample: torch.Tensor) -> None:
        super().__init__(sample=sample)

    @property
    def sample(self) -> torch.Tensor:
        return dict.__getitem__(self, "sample")


class PipelineOutput(FieldOutput):
    """frames: list (videos) of lists of PIL images, or (B, F, H, W, 3) np.float32 for "np", or (B, F, 3, H, W) for
    "pt", or the final (B, F, 4, H/8, W/8) latents for "latent".

    As diffusers' BaseOutput, an ordered mapping of its one field, read as an attribute, by key or by position:
    out.frames, out["frames"], out[0], out.to_tuple(), len(out), list(out), dict(out)."""

    def __init__(self, frames: Any) -> None:
        super().__init__(frames=frames)

    @property
    def frames(self) -> Any:
        return dict.__getitem__(self, "frames")

    @frames.setter
    def frames(self, value: Any) -> None:
        self["frames"] = value

    def __repr__(self) -> str:
        return f"PipelineOutput(frames={self.frames!r})"
