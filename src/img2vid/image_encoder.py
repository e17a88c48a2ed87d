"""The CLIP ViT image tower that turns the conditioning image into SVD's (B, projection_dim) image embedding, and the
preprocessing that feeds it.

Parameter names are exactly transformers' `CLIPVisionModelWithProjection` state_dict names, so an
`image_encoder/model.safetensors` loads with no renaming. The only output SVD uses is `image_embeds`: the projected,
post-layer-normed class token. `preprocess` reproduces diffusers' `StableVideoDiffusionPipeline._encode_image` for
image inputs: a Gaussian-blur anti-aliased bicubic resize done in [-1, 1], then CLIP's mean/std normalisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from img2vid.attention import attention
from img2vid.configs import CLIPVisionConfig
from img2vid.layers import Placed


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # OpenAI CLIP's sigmoid approximation of GELU (transformers' QuickGELUActivation).
    return x * torch.sigmoid(1.702 * x)


class CLIPVisionEmbeddings(nn.Module):
    """Patchify with a stride-`patch_size` conv, prepend the class token, add the learned position table."""

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.image_size = config.image_size
        self.class_embedding = nn.Parameter(torch.empty(config.hidden_size))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, config.patch_size, stride=config.patch_size, bias=False
        )
        num_positions = (config.image_size // config.patch_size) ** 2 + 1  # patches + the class token
        # Every position is always used, so the table's weight is added whole: no position_ids buffer is needed.
        # Given its weight, nn.Embedding skips its own random init (see below).
        self.position_embedding = nn.Embedding(
            num_positions, config.hidden_size, _weight=torch.empty(num_positions, config.hidden_size)
        )
        # Random init only off the meta device: normal_ on meta tensors imports torch's Python decompositions
        # (sympy and more, ~1-3.5 s of a new process's first load, which builds every model on the meta device).
        if not self.class_embedding.is_meta:
            with torch.no_grad():
                self.class_embedding.normal_(std=config.hidden_size**-0.5)
                self.position_embedding.weight.normal_()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        b, _, h, w = pixel_values.shape
        if h != self.image_size or w != self.image_size:
            raise ValueError(f"image encoder expects {self.image_size}x{self.image_size} pixels, got {h}x{w}")
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(weight.dtype))  # (B, D, h/p, w/p)
        patches = patches.flatten(2).transpose(1, 2)  # (B, D, h/p, w/p) -> (B, N, D)
        cls = self.class_embedding.to(patches.dtype).expand(b, 1, -1)  # (D,) -> (B, 1, D)
        tokens = torch.cat([cls, patches], dim=1)  # (B, 1 + N, D)
        return tokens + self.position_embedding.weight.to(tokens.dtype)


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.heads = config.num_attention_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # SDPA's default 1/sqrt(head_dim) scale is CLIP's scale; no mask (bidirectional over all 257 tokens).
        out = attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads)
        return self.out_proj(out)


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.quick_gelu = config.hidden_act == "quick_gelu"
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = _quick_gelu(h) if self.quick_gelu else F.gelu(h)  # "gelu" is the exact erf form, as in transformers
        return self.fc2(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    # Exists only so the layers are named `encoder.layers.N`, as in transformers.
    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPVisionTransformer(nn.Module):
    """transformers' `CLIPVisionModel` body: returns the post-layer-normed class token (its `pooler_output`)."""

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # sic: transformers' name
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)))  # (B, 1 + N, D)
        # Only the class token feeds image_embeds; the post norm runs on it alone, as in transformers.
        return self.post_layernorm(x[:, 0])  # (B, 1 + N, D) -> (B, D)


class ImageEncoder(Placed):
    """transformers' `CLIPVisionModelWithProjection`, returning only `image_embeds`.

    forward: (B, num_channels, image_size, image_size) normalised pixels (see `preprocess`) -> (B, projection_dim).
    Holds no buffers, so it can be built on the meta device and filled with `load_state_dict(sd, assign=True)`;
    drop `sgm_keys.POSITION_IDS` from a checkpoint first.
    """

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        if config.hidden_act not in ("gelu", "quick_gelu"):
            raise ValueError(f"unsupported CLIP activation {config.hidden_act!r}")
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"hidden_size {config.hidden_size} not divisible by {config.num_attention_heads} heads")
        self.config = config
        self.vision_model = CLIPVisionTransformer(config)
        self.visual_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(self.vision_model(pixel_values))


# ---------------------------------------------------------------------------------------------------------------------
# Preprocessing: diffusers' SVD `_encode_image` for non-tensor images (its `_resize_with_antialiasing`, a port of
# kornia's resize with antialias=True) followed by `CLIPImageProcessor` normalisation only.


def _gaussian_kernel(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Normalised 1D Gaussian of odd `size` -> (size,). Built in `dtype` with the reference's op order so the weights
    are the same numbers."""
    x = torch.arange(size, dtype=dtype, device=device) - size // 2
    s = torch.tensor(sigma, dtype=dtype, device=device)
    g = torch.exp(-x.pow(2.0) / (2 * s.pow(2.0)))
    return g / g.sum()


def _blur_axis(x: torch.Tensor, kernel: torch.Tensor, axis: int) -> torch.Tensor:
    """Reflect-padded 1D convolution of (N, 1, H, W) along H (axis=2) or W (axis=3).

    On the CPU a conv2d, as the reference runs it. Elsewhere a sum of shifted copies (`_blur_taps`): a float32
    conv2d on CUDA runs in TF32 by default (torch.backends.cudnn.allow_tf32), 2.5e-4 off the float32 result for a
    576x1024 image (H100, run 53), where the shifted sum is float32 throughout."""
    pad = kernel.numel() // 2  # the kernel is odd, so the padding is symmetric
    if axis == 3:
        x = F.pad(x, (pad, pad, 0, 0), mode="reflect")
        weight = kernel.view(1, 1, 1, -1)  # (k,) -> (1, 1, 1, k)
    else:
        x = F.pad(x, (0, 0, pad, pad), mode="reflect")
        weight = kernel.view(1, 1, -1, 1)  # (k,) -> (1, 1, k, 1)
    if x.device.type == "cpu":
        return F.conv2d(x, weight)
    return _blur_taps(x, kernel, axis)


def _blur_taps(x: torch.Tensor, kernel: torch.Tensor, axis: int) -> torch.Tensor:
    """The valid 1D convolution (cross-correlation, as conv2d) of padded x along `axis` with kernel (k,), as k
    scaled shifted views summed in x's dtype."""
    k = kernel.numel()
    n = x.shape[axis] - k + 1
    out = x.narrow(axis, 0, n) * kernel[0]
    for t in range(1, k):
        out = out + x.narrow(axis, t, n) * kernel[t]
    return out


def resize_with_antialiasing(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> (B, C, h, w): diffusers' `_resize_with_antialiasing`, same numbers.

    Per axis, sigma = max((factor - 1) / 2, 0.001) with factor = old / new size (skimage's rule) and a kernel of
    int(max(4 sigma, 3)) taps forced odd; blur along W then H with reflect padding, then bicubic with
    align_corners=True. Works in x's dtype, like the reference.
    """
    b, c, h, w = x.shape
    factors = (h / size[0], w / size[1])
    sigmas = tuple(max((f - 1.0) / 2.0, 0.001) for f in factors)
    y = x.reshape(b * c, 1, h, w)  # (B, C, H, W) -> (B*C, 1, H, W): one depthwise kernel for every channel
    # W first, then H: the reference's order. An axis that is not downsampled has sigma clamped to 0.001, whose kernel
    # is exactly [0, 1, 0] (exp underflows to 0), an identity: skipping it changes no number.
    for axis, sigma in ((3, sigmas[1]), (2, sigmas[0])):
        if sigma == 0.001:
            continue
        taps = int(max(4.0 * sigma, 3))
        taps += 1 - taps % 2  # force odd
        y = _blur_axis(y, _gaussian_kernel(taps, sigma, x.dtype, x.device), axis)
    y = y.reshape(b, c, h, w)  # (B*C, 1, H, W) -> (B, C, H, W)
    return F.interpolate(y, size=size, mode="bicubic", align_corners=True)


def preprocess(images: torch.Tensor, config: CLIPVisionConfig) -> torch.Tensor:
    """(B, 3, H, W) float in [0, 1] -> (B, 3, image_size, image_size) float32 pixel_values for `ImageEncoder`.

    Computed in float32 whatever the input dtype, as diffusers does (its image tensor is float32 until it is cast to
    the encoder's dtype); cast the result to the encoder's dtype yourself (`ImageEncoder` also casts on entry).
    Resizing happens in [-1, 1], as the original sgm code does, then back to [0, 1] for CLIP's mean/std. Bicubic
    overshoot is not clamped (neither is it in the reference).
    """
    if images.ndim != 4 or images.shape[1] != len(config.image_mean):
        raise ValueError(f"expected (B, {len(config.image_mean)}, H, W) images, got {tuple(images.shape)}")
    x = images.float() * 2.0 - 1.0
    x = resize_with_antialiasing(x, (config.image_size, config.image_size))
    x = (x + 1.0) / 2.0
    mean = torch.tensor(config.image_mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)  # (3,) -> (1, 3, 1, 1)
    std = torch.tensor(config.image_std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)  # (3,) -> (1, 3, 1, 1)
    return (x - mean) / std
