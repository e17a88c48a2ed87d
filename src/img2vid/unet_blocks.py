"""Layers of the spatio-temporal UNet: resnets, transformers and their temporal twins.

Every module's attribute names are the ones diffusers uses (`UNetSpatioTemporalConditionModel`), so its state dict
loads with no renaming. Activations flow between blocks as (B*F, C, H, W) "frame batches"; a temporal layer views
them as videos only for the ops that actually mix frames.

Time conditioning: the UNet computes silu(time embedding) once, one row per frame, and every resnet takes that
already-activated `temb` (diffusers applies the same silu inside each resnet; the values are identical).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from img2vid import fused
from img2vid.add_norm import add_norm, layer_norm
from img2vid.layers import (
    attention,
    frame_attention,
    group_norm,
    temporal_conv,
    timestep_embedding,
    video_group_norm,
)


class TimeEmbedding(nn.Module):
    """Linear -> SiLU -> Linear over a sinusoidal embedding (diffusers `TimestepEmbedding`)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int | None = None) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden_dim)
        self.linear_2 = nn.Linear(hidden_dim, out_dim or hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        # The sinusoids are float32; like diffusers, run the MLP in the weights' dtype.
        return self.linear_2(F.silu(self.linear_1(x.to(self.linear_1.weight.dtype))))


class TimeMixer(nn.Module):
    """Learned blend of a spatial and a temporal branch (diffusers `AlphaBlender`, "learned_with_images").

    For video the `image_only_indicator` is all zeros, so the blend factor is simply sigmoid(mix_factor).
    """

    def __init__(self) -> None:
        super().__init__()
        self.mix_factor = nn.Parameter(torch.full((1,), 0.5))

    def forward(self, spatial: Tensor, temporal: Tensor) -> Tensor:
        alpha = torch.sigmoid(self.mix_factor).to(spatial.dtype)
        # Same expression (and so the same half-precision rounding) as the reference, not a lerp.
        return alpha * spatial + (1.0 - alpha) * temporal


# ---------------------------------------------------------------------------------------------------------------------
# Resnets


class SpatialResBlock(nn.Module):
    """Per-frame resnet (diffusers `ResnetBlock2D` with default options)."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, eps: float, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        """x: (B*F, C_in, H, W); temb: (B*F, T), already through silu."""
        # SiLU in place on the norm's fresh output: one fewer full-size temporary in eager runs.
        h = self.conv1(F.silu(group_norm(x, self.norm1), inplace=True))
        h = h + self.time_emb_proj(temb)[:, :, None, None]  # (B*F, C) -> (B*F, C, 1, 1)
        h = self.conv2(F.silu(group_norm(h, self.norm2), inplace=True))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class TemporalResBlock(nn.Module):
    """Resnet over the frame axis with (3, 1, 1) kernels (diffusers `TemporalResnetBlock`).

    Its GroupNorms see a whole video at once (statistics over C/G x F x H x W), as trained. x is a transposed view of
    the frames; the norms and the convs read it where it lies (`video_group_norm`, `temporal_conv`) instead of
    F.group_norm's and cuDNN's layout copies, so every tensor here keeps the frames' layout."""

    def __init__(self, ch: int, temb_ch: int, eps: float, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, ch, eps=eps)
        self.conv1 = nn.Conv3d(ch, ch, (3, 1, 1), padding=(1, 0, 0))
        self.time_emb_proj = nn.Linear(temb_ch, ch)
        self.norm2 = nn.GroupNorm(groups, ch, eps=eps)
        self.conv2 = nn.Conv3d(ch, ch, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        """x: (B, C, F, H, W); temb: (B, F, T), already through silu."""
        h = temporal_conv(F.silu(video_group_norm(x, self.norm1), inplace=True), self.conv1)
        h = h + self.time_emb_proj(temb).permute(0, 2, 1)[:, :, :, None, None]  # (B, F, C) -> (B, C, F, 1, 1)
        h = temporal_conv(F.silu(video_group_norm(h, self.norm2), inplace=True), self.conv2)
        return x + h


class SpatioTemporalResBlock(nn.Module):
    """Spatial resnet, then its temporal twin, blended by a learned factor (diffusers `SpatioTemporalResBlock`)."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, eps: float, groups: int) -> None:
        super().__init__()
        self.spatial_res_block = SpatialResBlock(in_ch, out_ch, temb_ch, eps, groups)
        self.temporal_res_block = TemporalResBlock(out_ch, temb_ch, eps, groups)
        self.time_mixer = TimeMixer()

    def forward(self, x: Tensor, temb: Tensor, num_frames: int) -> Tensor:
        x = self.spatial_res_block(x, temb)
        bf, c, h, w = x.shape
        b = bf // num_frames
        # A view, not a copy, whatever the memory format.
        video = x.reshape(b, num_frames, c, h, w).permute(0, 2, 1, 3, 4)  # (B*F, C, H, W) -> (B, C, F, H, W)
        temporal = self.temporal_res_block(video, temb.reshape(b, num_frames, -1))  # temb (B*F, T) -> (B, F, T)
        mixed = self.time_mixer(video, temporal)
        return mixed.permute(0, 2, 1, 3, 4).reshape(bf, c, h, w)  # (B, C, F, H, W) -> (B*F, C, H, W)


class Downsample(nn.Module):
    """Stride-2 3x3 conv (diffusers `Downsample2D(use_conv=True, padding=1)`)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to the skip connection's size, then a 3x3 conv (diffusers `Upsample2D`).

    Interpolating to an explicit size equals scale_factor=2 when sizes are even and, like diffusers' forwarded
    `upsample_size`, matches the skip connection when a latent side is not a multiple of the total downsampling.
    """

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


# ---------------------------------------------------------------------------------------------------------------------
# Transformers


class Attention(nn.Module):
    """Multi-head attention with bias-free q/k/v and a biased output projection (diffusers `Attention` defaults)."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])  # index 1 (dropout) holds no weights

    def forward(self, x: Tensor, context: Tensor | None = None, frames: int | None = None) -> Tensor:
        """x: (N, L, query_dim); context: (N, S, context_dim) or None for self-attention.

        Returns (N, L, query_dim), or (N, 1, query_dim) when the context is a single token: softmax over one key is
        exactly 1, so every query receives that token's value. SVD's CLIP context is one token, so this skips the
        query/key projections and the output projection of every query (the caller broadcasts).
        With `frames`, self-attention runs along the frame axis of frame-major tokens x: (B*F, H*W, query_dim)
        (`frame_attention`), as the reference's attention over (B*H*W, F, query_dim) does.
        """
        if context is not None and context.shape[1] == 1:
            return self.to_out[0](self.to_v(context))
        if frames is not None:
            out = frame_attention(self.to_q(x), self.to_k(x), self.to_v(x), self.heads, frames)
            return self.to_out[0](out)
        if context is None:
            context = x
        return self.to_out[0](attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads))


class GEGLU(nn.Module):
    """h * gelu(gate) for (h, gate) = proj(x).chunk(2, -1). On CUDA in float16 one fused kernel computes it
    without writing the 2x-wide projection (`fused.geglu_linear`); `fused = False` keeps the plain ops (the
    benchmarks' A/B switch)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)
        self.fused = True

    def forward(self, x: Tensor) -> Tensor:
        # type() rather than isinstance: an fp8 or otherwise replaced projection keeps its own forward
        if self.fused and type(self.proj) is nn.Linear and fused.geglu_supported(x, self.proj.weight):
            out = fused.geglu_linear(x.reshape(-1, x.shape[-1]), self.proj.weight, self.proj.bias)  # (M, N)
            return out.view(*x.shape[:-1], out.shape[-1])  # (M, N) -> (..., N)
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward with a 4x hidden width (diffusers `FeedForward(activation_fn="geglu")`)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        # The reference keeps a dropout at index 1; an Identity holds its place so `net.2` keeps its name.
        self.net = nn.ModuleList([GEGLU(dim, dim * 4), nn.Identity(), nn.Linear(dim * 4, dim)])

    def forward(self, x: Tensor) -> Tensor:
        return self.net[2](self.net[0](x))


# Eager runs slice a feed-forward whose GEGLU intermediate would be larger than this many elements (256 MB in
# float16). Unsliced, the first block's (50 frames x 72x128 tokens, 2560 wide: 2.4 GB, plus its two 1.2 GB halves)
# was the eager step's memory peak. Compiled graphs stay whole: inductor fuses the GEGLU and never holds the halves.
FF_SLICE_ELEMENTS = 1 << 27


def _feed_forward(ff: FeedForward, x: Tensor, chunk_size: int | None, axis_size: int) -> Tensor:
    """The feed-forward in slices that bound its 8x-wide intermediate: when chunking is on, slices holding as many
    tokens as `chunk_size` entries of the sliced axis (`axis_size` long) would (diffusers' `_chunked_feed_forward`),
    or, in eager mode, slices of at most FF_SLICE_ELEMENTS intermediate values.

    Slices are always whole rows of dim 0, whatever axis the reference slices: a slice across another dim is a
    strided view, which the linear layers turn into one tiny matrix product per row (a 5-frame slice of the
    reference's (B*H*W, F, C) temporal tokens ran at half the speed of the whole step). The feed-forward is per
    token, so the slicing changes no value beyond the matrix kernels' choice for another row count; a remainder
    slice is allowed."""
    rows = x.shape[0]
    if chunk_size is not None:
        rows_per_slice = max(1, rows * min(chunk_size, axis_size) // axis_size)
    else:
        per_row = x[0].numel() * 8  # GEGLU: 2 x 4x wide per token
        if torch.compiler.is_compiling() or rows * per_row <= FF_SLICE_ELEMENTS:
            return ff(x)
        rows_per_slice = max(1, FF_SLICE_ELEMENTS // per_row)
    if rows_per_slice >= rows:
        return ff(x)
    parts = x.split(rows_per_slice)
    first = ff(parts[0])
    # Filled slice by slice: a torch.cat would hold every piece and the joined copy at once.
    out = first.new_empty(x.shape[:-1] + first.shape[-1:])
    out[: len(first)] = first
    start = len(first)
    del first
    for part in parts[1:]:
        out[start : start + len(part)] = ff(part)
        start += len(part)
    return out


def _cross_attend_norm(
    x: Tensor, update: Tensor, attn: Attention, context: Tensor, norms: tuple[nn.LayerNorm, nn.LayerNorm]
) -> tuple[Tensor, Tensor]:
    """(x2, norm3(x2)) for x1 = x + update (the self-attention's output) and x2 = x1 + attn(norm2(x1), context),
    where x, update: (N*M, L, C) hold N videos and context: (N, S, D) one per video; norms = (norm2, norm3).

    Queries never interact in attention, so all tokens of one video form a single query sequence against that
    video's context instead of copying the context to every frame / pixel (which diffusers does). With one context
    token (SVD's) the cross-attention ignores its queries (see Attention.forward): its (N, 1, C) result is one vector
    per video, added with the self-attention's output and normalized in one pass (`add_norm`), and norm2 is never
    computed.
    """
    nm, seq, c = x.shape
    n = context.shape[0]
    norm2, norm3 = norms
    if context.shape[1] == 1:
        per_video = attn(x[:n, :1], context)[:, 0]  # (N, C); the queries are not read
        return add_norm(x, update, norm3, per_video, nm // n * seq)  # rows of one video: M*L
    grouped = (x + update).reshape(n, -1, c)  # (N*M, L, C) -> (N, M*L, C)
    grouped = grouped + attn(norm2(grouped), context)  # (N, M*L, C)
    x = grouped.reshape(nm, seq, c)  # (N, M*L, C) -> (N*M, L, C)
    return x, norm3(x)


class SpatialTransformerBlock(nn.Module):
    """Self-attention over a frame's pixels, cross-attention to the image embedding, GEGLU feed-forward
    (diffusers `BasicTransformerBlock`)."""

    def __init__(self, dim: int, heads: int, context_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, dim, heads, dim // heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim, heads, dim // heads)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)
        self.chunk_size: int | None = None
        self.chunk_dim = 0

    def set_chunk_feed_forward(self, chunk_size: int | None, dim: int) -> None:
        self.chunk_size, self.chunk_dim = chunk_size, dim

    def forward(self, x: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B*F, H*W, C); context: (B, S, D). Returns the block's output as its two addends (the residual stream
        and the feed-forward's output), so that the next block forms their sum together with its first norm
        (`add_norm`)."""
        update = self.attn1(layer_norm(x, self.norm1))
        x, h = _cross_attend_norm(x, update, self.attn2, context, (self.norm2, self.norm3))
        return x, _feed_forward(self.ff, h, self.chunk_size, x.shape[self.chunk_dim])


class TemporalTransformerBlock(nn.Module):
    """The same three sub-layers over each pixel's sequence of frames, preceded by an extra residual feed-forward
    (diffusers `TemporalBasicTransformerBlock`; its `time_mix_inner_dim` always equals `dim` here)."""

    def __init__(self, dim: int, heads: int, context_dim: int) -> None:
        super().__init__()
        self.norm_in = nn.LayerNorm(dim)
        self.ff_in = FeedForward(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, dim, heads, dim // heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim, heads, dim // heads)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)
        self.chunk_size: int | None = None

    def set_chunk_feed_forward(self, chunk_size: int | None, dim: int) -> None:
        # Like diffusers, always slice over frames (as many tokens as `chunk_size` frames hold): `dim` is ignored.
        self.chunk_size = chunk_size

    def forward(self, x: Tensor, f: Tensor, context: Tensor, num_frames: int, pos: Tensor) -> tuple[Tensor, Tensor]:
        """The block on x + f + pos, where x + f is the spatial block's output (its two addends, x, f: (B*F, H*W, C))
        and pos: (F, C) the frame embedding (added to each frame's tokens first, as the reference does before the
        block); context: (B, S, D) (the reference also uses each video's first-frame context). Returns (x + f, the
        block's output), the time mixer's two inputs.

        The reference transposes the tokens to (B*H*W, F, C) for this block and back after it. Every layer here but
        the self-attention is per token, and that one runs along the frame axis in place (`frame_attention`), so
        the tokens stay frame-major: two full-size transposing copies fewer per block. The spatial output x + f is
        stored once, with this block's first norm of it plus pos, and x + f + pos never is: the first residual add
        adds pos again (`add_norm`). All of it inside this module's call, where sequential offload has brought its
        weights in."""
        seq = x.shape[1]
        x, h = add_norm(x, f, self.norm_in, pos, seq, vec_in_sum=False)  # token row r is in frame (r // L) % F
        spatial_out = x
        h = _feed_forward(self.ff_in, h, self.chunk_size, num_frames)
        x, h = add_norm(x, h, self.norm1, pos, seq)  # token row r is in frame (r // L) % F
        x, h = _cross_attend_norm(x, self.attn1(h, frames=num_frames), self.attn2, context, (self.norm2, self.norm3))
        return spatial_out, x + _feed_forward(self.ff, h, self.chunk_size, num_frames)


class SpatioTemporalTransformer(nn.Module):
    """Spatial transformer blocks, each followed by a temporal twin with a frame-index embedding, blended by a
    learned factor (diffusers `TransformerSpatioTemporalModel`)."""

    def __init__(self, ch: int, heads: int, context_dim: int, depth: int, groups: int) -> None:
        super().__init__()
        if ch % heads:
            raise ValueError(f"{ch} channels do not split into {heads} attention heads")
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, ch)
        self.transformer_blocks = nn.ModuleList([SpatialTransformerBlock(ch, heads, context_dim) for _ in range(depth)])
        self.temporal_transformer_blocks = nn.ModuleList(
            [TemporalTransformerBlock(ch, heads, context_dim) for _ in range(depth)]
        )
        self.time_pos_embed = TimeEmbedding(ch, ch * 4, ch)
        self.time_mixer = TimeMixer()
        self.proj_out = nn.Linear(ch, ch)

    def forward(self, x: Tensor, context: Tensor, num_frames: int) -> Tensor:
        """x: (B*F, C, H, W); context: (B, S, D)."""
        bf, c, h, w = x.shape
        residual = x
        # (B*F, C, H, W) -> (B*F, H*W, C): a view for channels-last activations
        tokens = group_norm(x, self.norm).permute(0, 2, 3, 1).reshape(bf, h * w, c)
        tokens = self.proj_in(tokens)

        # Frame-position embedding: sinusoids of the frame index 0..F-1 through an MLP, one row per frame.
        frame_index = torch.arange(num_frames, device=x.device)
        pos = self.time_pos_embed(timestep_embedding(frame_index, c))  # (F, C)

        for spatial, temporal in zip(self.transformer_blocks, self.temporal_transformer_blocks, strict=True):
            x, f = spatial(tokens, context)  # the spatial block's output is x + f
            tokens = self.time_mixer(*temporal(x, f, context, num_frames, pos))

        out = self.proj_out(tokens).reshape(bf, h, w, c).permute(0, 3, 1, 2)  # (B*F, H*W, C) -> (B*F, C, H, W)
        # residual first: the sum then takes the residual's memory format (NCHW or channels_last), with no copy.
        return residual + out
