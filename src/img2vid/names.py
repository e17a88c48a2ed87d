"""Names the front ends and the loaders must agree on, in a module that imports nothing heavy (the CLI reads them
before deciding whether to load torch)."""

from __future__ import annotations

import re

# A hub repo id, "owner/name"; the hub's own validation (huggingface_hub) runs after this, on what passes it.
REPO_ID = re.compile(r"^[\w][\w.-]*/[\w.-]+$")
# Weights files that are pickles: read only with allow_pickle (unpickling can run code).
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
# Plain values: the module attributes that are settings, not submodules or tensors (keys of compiled graphs)
PLAIN = (bool, int, float, str, type(None))
