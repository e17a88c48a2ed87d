"""img2vid: Stable Video Diffusion image-to-video in plain PyTorch."""

from __future__ import annotations

from typing import Any

from img2vid.errors import CheckpointError, InputError, NonFiniteVideo  # cheap: no torch, PIL or numpy

__version__ = "0.1.0"
__all__ = ["Pipeline", "PipelineOutput", "InputError", "CheckpointError", "NonFiniteVideo", "__version__"]


def __getattr__(name: str) -> Any:
    # Imported on first use so `import img2vid` stays cheap (the CLI's --help, `img2vid info`).
    if name in ("Pipeline", "PipelineOutput"):
        from img2vid import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'img2vid' has no attribute {name!r}")
