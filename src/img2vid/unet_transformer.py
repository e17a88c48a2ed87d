"""The spatio-temporal transformers of the UNet (diffusers `TransformerSpatioTemporalModel` and its blocks):
self-attention over each frame's pixels, cross-attention to the image embedding and GEGLU feed-forwards, then the
same over each pixel's frames, blended by a learned factor.

Attribute names are diffusers', so the state dict loads with no renaming. The tokens stay frame-major, (B*F, H*W, C),
throughout: the attention along the frame axis reads them in place (`layers.frame_attention`). Residual adds are
fused with the LayerNorm after them (`add_norm`), and the linear layers' biases join those fused ops or the next
pointwise kernel instead of the products' epilogues (`_product`). The spatial self-attentions project q, k and v
with one matrix product, so the tokens are read once, not three times (`Attention`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from img2vid import fused
from img2vid.add_norm import add_norm, layer_norm
from img2vid.attention import attention
from img2vid.layers import frame_attention, group_norm, timestep_embedding, vector_sum, with_bias
from img2vid.unet_blocks import TimeEmbedding, TimeMixer


def _product(lin: nn.Module, x: Tensor, fold: bool = True) -> tuple[Tensor, Tensor | None]:
    """(x W^T, b) for a plain biased nn.Linear, whose bias the caller adds where it costs nothing: in a row vector
    of the fused add + norm (`add_norm`), or, in compiled graphs, in the next pointwise kernel. (lin(x), None) when
    fold is off or lin is not a plain Linear (an fp8 projection). Why: at SVD's first level cuBLAS's bias epilogue
    made the bandwidth-bound (460800 x 320) x (320 x 320) product 1.7x slower (0.352 vs 0.208 ms) and the
    (x 1280) x (1280 x 320) one 16% (0.665 vs 0.575 ms; H100, run 64).

    lin's weight is read here, outside lin's own call, so the calling module must own lin (name it in its
    `weights_read_here`: sequential offload then never streams lin on its own, see offload.plan_units). The bias
    comes back detached, a view of the copy the unit's offload hook brought in, valid after the unit's call."""
    if fold and type(lin) is nn.Linear and lin.bias is not None:
        return F.linear(x, lin.weight), lin.bias.detach()
    return lin(x), None


class Attention(nn.Module):
    """Multi-head attention with bias-free q/k/v and a biased output projection (diffusers `Attention` defaults).

    Self-attention over a frame's pixels computes q, k and v with one product against the three weights stacked
    (`_self_qkv`), which reads x once instead of three times: at SVD's first level (460800 tokens x 320 channels,
    H100) one 320 -> 960 product took 0.51-0.59 ms against 0.62-0.67 ms for three 320 -> 320 ones (run 64 and a
    later check; 0.50 against 0.86 ms in run 73's compiled level-1 block). q, k and v are then strided views of its
    output, which every SDPA kernel reads where they lie. The attention along the frame axis keeps three products:
    its SDPA fallback (GPUs before Hopper, bfloat16) would have to copy such views (three copies to save two
    reads), and on Hopper the gain was ~0.08 ms a call."""

    weights_read_here = ("to_q", "to_k", "to_v", "to_out")  # see _product and _self_qkv

    def __init__(self, query_dim: int, context_dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])  # index 1 (dropout) holds no weights

    def forward(
        self, x: Tensor, context: Tensor | None = None, frames: int | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """x: (N, L, query_dim); context: (N, S, context_dim) or None for self-attention.

        Returns (out, b): the output projection's product (N, L, query_dim) and its bias (query_dim,), which the
        caller adds (see `_product`), or b None when out holds it already. When the context is a single token, out
        is (N, 1, query_dim), bias included: softmax over one key is exactly 1, so every query receives that
        token's value. SVD's CLIP context is one token, so this skips the query/key projections and the output
        projection of every query (the caller broadcasts).
        With `frames`, self-attention runs along the frame axis of frame-major tokens x: (B*F, H*W, query_dim)
        (`frame_attention`), as the reference's attention over (B*H*W, F, query_dim) does.
        """
        if context is not None and context.shape[1] == 1:
            return self.to_out[0](self.to_v(context)), None
        if frames is not None:
            out = frame_attention(self.to_q(x), self.to_k(x), self.to_v(x), self.heads, frames)
        elif context is None:
            out = attention(*self._self_qkv(x), self.heads)
        else:
            out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads)
        return _product(self.to_out[0], out)

    def _self_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(to_q(x), to_k(x), to_v(x)) for x: (N, L, query_dim), as one product when all three are plain bias-free
        Linears (fp8 projections keep their own forwards): then q, k and v are (N, L, inner) views of the
        (N, L, 3*inner) product, each row 3*inner apart, and nothing copies them (`attention.attention`).

        The weights are read here, outside the projections' own calls (hence `weights_read_here`), and stacked on
        every call (a 3*inner x query_dim copy, 0.6 MB at SVD's first level) rather than stored fused: a stored
        copy would hold the weights twice, and offloading, which moves parameters, would not move it."""
        projections = (self.to_q, self.to_k, self.to_v)
        if not all(type(m) is nn.Linear and m.bias is None for m in projections):
            return self.to_q(x), self.to_k(x), self.to_v(x)
        w = torch.cat([m.weight for m in projections])  # 3 x (inner, query_dim) -> (3*inner, query_dim)
        qkv = F.linear(x, w)  # (N, L, 3*inner)
        q, k, v = qkv.split(self.to_q.out_features, dim=-1)  # 3 x (N, L, inner), strided views
        return q, k, v


class GEGLU(nn.Module):
    """h * gelu(gate) for (h, gate) = proj(x).chunk(2, -1). On CUDA in float16 one fused kernel computes it
    without writing the 2x-wide projection (`fused.geglu_linear`); `fused = False` keeps the plain ops (the
    benchmarks' A/B switch)."""

    weights_read_here = ("proj",)  # the fused kernel reads proj's weights

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)
        self.fused = True

    def forward(self, x: Tensor) -> Tensor:
        # type() rather than isinstance: an fp8 or otherwise replaced projection keeps its own forward
        if self.fused and type(self.proj) is nn.Linear and fused.geglu_supported(x, self.proj.weight):
            op = fused.geglu_linear_impl if fused.direct_calls() else fused.geglu_linear
            out = op(x.reshape(-1, x.shape[-1]), self.proj.weight, self.proj.bias)  # (M, N)
            return out.view(*x.shape[:-1], out.shape[-1])  # (M, N) -> (..., N)
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward with a 4x hidden width (diffusers `FeedForward(activation_fn="geglu")`)."""

    weights_read_here = ("net",)  # see _product

    def __init__(self, dim: int) -> None:
        super().__init__()
        # The reference keeps a dropout at index 1; an Identity holds its place so `net.2` keeps its name.
        self.net = nn.ModuleList([GEGLU(dim, dim * 4), nn.Identity(), nn.Linear(dim * 4, dim)])

    def forward(self, x: Tensor, fold_bias: bool = True) -> tuple[Tensor, Tensor | None]:
        """(out, b): the output projection's product and, with fold_bias, its bias for the caller to add (see
        `_product`); b is None when out holds it."""
        return _product(self.net[2], self.net[0](x), fold_bias)


# Eager runs slice a feed-forward whose GEGLU intermediate would be larger than this many elements (256 MB in
# float16). Unsliced, the first block's (50 frames x 72x128 tokens, 2560 wide: 2.4 GB, plus its two 1.2 GB halves)
# was the eager step's memory peak. Compiled graphs stay whole: inductor fuses the GEGLU and never holds the halves.
FF_SLICE_ELEMENTS = 1 << 27


def _feed_forward(
    ff: FeedForward, x: Tensor, chunk_size: int | None, axis_size: int, fold_bias: bool = True
) -> tuple[Tensor, Tensor | None]:
    """(out, b) of `FeedForward.forward`, in slices that bound its 8x-wide intermediate: when chunking is on, slices
    holding as many tokens as `chunk_size` entries of the sliced axis (`axis_size` long) would (diffusers'
    `_chunked_feed_forward`), or, in eager mode, slices of at most FF_SLICE_ELEMENTS intermediate values.

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
            return ff(x, fold_bias)
        rows_per_slice = max(1, FF_SLICE_ELEMENTS // per_row)
    if rows_per_slice >= rows:
        return ff(x, fold_bias)
    lin = ff.net[2]
    if type(lin) is nn.Linear and not torch.compiler.is_compiling() and not torch.is_grad_enabled():
        # Eager inference: each slice's output product writes its rows of the result in place (a torch.cat would
        # hold every piece and the joined copy at once; assigning each piece cost a copy of it: 0.51 ms a
        # first-level block). out= has no autograd, hence inference only. lin's weights are read here, in the
        # calling block's forward: the blocks name ff in weights_read_here
        out = x.new_empty(x.shape[:-1] + (lin.out_features,))  # (..., C)
        folded = fold_bias and lin.bias is not None
        bias = lin.bias.detach() if folded else None  # returned for the caller to add (see _product)
        added = None if folded else lin.bias  # added by the product itself, or None
        for start in range(0, rows, rows_per_slice):
            h = ff.net[0](x[start : start + rows_per_slice])  # (n, ..., 4C), contiguous
            h2 = h.view(-1, h.shape[-1])  # (n*..., 4C)
            rows_out = out[start : start + rows_per_slice].view(-1, lin.out_features)  # (n*..., C), contiguous
            # lin.weight.t(): (C, 4C) -> (4C, C), a transposed view the product reads as it lies
            if added is None:
                torch.mm(h2, lin.weight.t(), out=rows_out)
            else:
                torch.addmm(added, h2, lin.weight.t(), out=rows_out)
        return out, bias
    parts = x.split(rows_per_slice)
    first, bias = ff(parts[0], fold_bias)
    out = first.new_empty(x.shape[:-1] + first.shape[-1:])  # filled slice by slice, as above
    out[: len(first)] = first
    start = len(first)
    del first
    for part in parts[1:]:
        out[start : start + len(part)] = ff(part, fold_bias)[0]  # the same bias every slice
        start += len(part)
    return out, bias


def _cross_attend_norm(
    x: Tensor,
    update: Tensor,
    bias: Tensor | None,
    attn: Attention,
    context: Tensor,
    norms: tuple[nn.LayerNorm, nn.LayerNorm],
) -> tuple[Tensor, Tensor]:
    """(x2, norm3(x2)) for x1 = x + update + bias (the self-attention's output, its projection's bias (C,) or None
    apart) and x2 = x1 + attn(norm2(x1), context), where x, update: (N*M, L, C) hold N videos and context: (N, S, D)
    one per video; norms = (norm2, norm3).

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
        per_video = attn(x[:n, :1], context)[0][:, 0]  # (N, C); the queries are not read
        return add_norm(x, update, norm3, vector_sum(per_video, bias), nm // n * seq)  # rows of one video: M*L
    grouped = (x + with_bias(update, bias)).reshape(n, -1, c)  # (N*M, L, C) -> (N, M*L, C)
    grouped = grouped + with_bias(*attn(norm2(grouped), context))  # (N, M*L, C)
    x = grouped.reshape(nm, seq, c)  # (N, M*L, C) -> (N*M, L, C)
    return x, norm3(x)


class SpatialTransformerBlock(nn.Module):
    """Self-attention over a frame's pixels, cross-attention to the image embedding, GEGLU feed-forward
    (diffusers `BasicTransformerBlock`)."""

    # the fused add + norm reads the norms (offload.plan_units); eager feed-forward slices read ff's output
    # projection (_feed_forward)
    weights_read_here = ("norm1", "norm3", "ff")

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

    def forward(self, x: Tensor, context: Tensor, x_bias: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """The block on x + x_bias, where x: (B*F, H*W, C) and x_bias (C,) is the bias its producer left to this
        block (see `_product`) or None; context: (B, S, D). Returns the block's output as its addends (the residual
        stream, the feed-forward's product and, in compiled graphs, that product's bias (C,), else None), so that
        the next block forms their sum together with its first norm (`add_norm`)."""
        update, bias = self.attn1(layer_norm(x, self.norm1, x_bias))
        x, h = _cross_attend_norm(x, update, vector_sum(bias, x_bias), self.attn2, context, (self.norm2, self.norm3))
        # Eager, an extra add of the bias would cost a full pass: only compiled graphs fold it (into the mixer)
        f, f_bias = _feed_forward(self.ff, h, self.chunk_size, x.shape[self.chunk_dim], torch.compiler.is_compiling())
        return x, f, f_bias


class TemporalTransformerBlock(nn.Module):
    """The same three sub-layers over each pixel's sequence of frames, preceded by an extra residual feed-forward
    (diffusers `TemporalBasicTransformerBlock`; its `time_mix_inner_dim` always equals `dim` here)."""

    weights_read_here = ("norm_in", "norm1", "norm3", "ff_in", "ff")  # as SpatialTransformerBlock's

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

    def forward(
        self, x: Tensor, f: Tensor, f_bias: Tensor | None, context: Tensor, num_frames: int, pos: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The block on x + f + f_bias + pos, where x + f + f_bias is the spatial block's output (its addends,
        x, f: (B*F, H*W, C), f_bias (C,) or None) and pos: (F, C) the frame embedding (added to each frame's tokens
        first, as the reference does before the block); context: (B, S, D) (the reference also uses each video's
        first-frame context). Returns (x + f + f_bias, x', u), the time mixer's inputs: the spatial output and the
        block's output x' + u as its last residual add's two addends (the mixer adds them, in one pass on CUDA).

        The reference transposes the tokens to (B*H*W, F, C) for this block and back after it. Every layer here but
        the self-attention is per token, and that one runs along the frame axis in place (`frame_attention`), so
        the tokens stay frame-major: two full-size transposing copies fewer per block. The spatial output x + f is
        stored once, with this block's first norm of it plus pos, and x + f + pos never is: the first residual add
        adds pos again (`add_norm`). All of it inside this module's call, where sequential offload has brought its
        weights in."""
        seq = x.shape[1]
        # token row r is in frame (r // L) % F; the stored sum x + f leaves f_bias to its readers
        pos_f = vector_sum(pos, f_bias)  # (F, C)
        x, h = add_norm(x, f, self.norm_in, pos_f, seq, vec_in_sum=False)
        spatial_out = with_bias(x, f_bias)  # compiled graphs only, where the add fuses into the mixer's kernel
        h, bias = _feed_forward(self.ff_in, h, self.chunk_size, num_frames)
        x, h = add_norm(x, h, self.norm1, vector_sum(pos_f, bias), seq)
        update, bias = self.attn1(h, frames=num_frames)
        x, h = _cross_attend_norm(x, update, bias, self.attn2, context, (self.norm2, self.norm3))
        # as in the spatial block: the last bias is folded in compiled graphs only
        out, bias = _feed_forward(self.ff, h, self.chunk_size, num_frames, torch.compiler.is_compiling())
        return spatial_out, x, with_bias(out, bias)


class SpatioTemporalTransformer(nn.Module):
    """Spatial transformer blocks, each followed by a temporal twin with a frame-index embedding, blended by a
    learned factor (diffusers `TransformerSpatioTemporalModel`)."""

    weights_read_here = ("norm", "proj_in", "proj_out")  # group_norm and _product read them

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
        # The tokens are a view: contiguous for channels-last activations (compiled); for NCHW ones (eager)
        # transposed, which ATen hands to a batched product as a transposed operand instead of making the tokens
        # contiguous first, when the weights are frozen as the pipeline holds them (with trainable ones matmul
        # copies on purpose, sparing the weight gradient a large intermediate)
        tokens = group_norm(x, self.norm).flatten(2).transpose(1, 2)  # (B*F, C, H, W) -> (B*F, H*W, C)
        tokens, bias = _product(self.proj_in, tokens)  # the first block adds the bias (to its norm and its sum)

        # Frame-position embedding: sinusoids of the frame index 0..F-1 through an MLP, one row per frame.
        frame_index = torch.arange(num_frames, device=x.device)
        pos = self.time_pos_embed(timestep_embedding(frame_index, c))  # (F, C)

        for spatial, temporal in zip(self.transformer_blocks, self.temporal_transformer_blocks, strict=True):
            x, f, f_bias = spatial(tokens, context, bias)  # the spatial block's output is x + f + f_bias
            tokens = self.time_mixer(*temporal(x, f, f_bias, context, num_frames, pos))
            bias = None

        lin = self.proj_out
        if not torch.compiler.is_compiling() and residual.is_contiguous() and type(lin) is nn.Linear:
            # Eager, NCHW: W @ tokens^T per frame lands in the residual's (B*F, C, H*W) layout, and the product adds
            # the residual (plus the bias) as its C operand, instead of a product in the tokens' layout and a
            # strided add across the two layouts. The bias (C,) -> (1, C, 1, 1), broadcast over frames and pixels
            out = residual.clone() if lin.bias is None else residual + lin.bias.view(1, c, 1, 1)  # not x itself
            weight = lin.weight.expand(bf, c, c)  # (C, C) -> (B*F, C, C), a stride-0 view
            # out (B*F, C, H, W) -> (B*F, C, H*W) += (B*F, C, C) @ tokens (B*F, H*W, C) -> (B*F, C, H*W)
            out.view(bf, c, h * w).baddbmm_(weight, tokens.transpose(1, 2))
            return out
        # compiled graphs fold the bias into the residual add's kernel; eager, the product's epilogue adds it
        out = with_bias(*_product(lin, tokens, torch.compiler.is_compiling()))
        out = out.reshape(bf, h, w, c).permute(0, 3, 1, 2)  # (B*F, H*W, C) -> (B*F, C, H, W)
        # residual first: the sum then takes the residual's memory format (NCHW or channels_last), with no copy.
        return residual + out
