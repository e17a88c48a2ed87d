"""The spatio-temporal UNet of Stable Video Diffusion (diffusers `UNetSpatioTemporalConditionModel`, sgm `VideoUNet`).

Parameter names equal diffusers' state-dict names for every config it accepts, so a diffusers
`diffusion_pytorch_model.safetensors` loads strictly with no renaming. The forward pass has no host syncs, no
data-dependent shapes and no branches on tensor values, so it compiles with `torch.compile(fullgraph=True)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from img2vid.configs import UNetConfig
from img2vid.layers import Placed, channels_last_, group_norm, timestep_embedding
from img2vid.outputs import SampleOutput
from img2vid.unet_blocks import Downsample, SpatioTemporalResBlock, TimeEmbedding, Upsample
from img2vid.unet_transformer import SpatialTransformerBlock, SpatioTemporalTransformer, TemporalTransformerBlock


def _transformers(n: int, ch: int, heads: int, context_dim: int, depth: int, groups: int) -> nn.ModuleList:
    """One spatio-temporal transformer after each resnet of a CrossAttn block."""
    return nn.ModuleList([SpatioTemporalTransformer(ch, heads, context_dim, depth, groups) for _ in range(n)])


class DownBlock(nn.Module):
    """diffusers `CrossAttnDownBlockSpatioTemporal` (cross_attention) or `DownBlockSpatioTemporal`."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        temb_ch: int,
        num_layers: int,
        cross_attention: bool,
        transformer_depth: int,
        heads: int,
        context_dim: int,
        add_downsample: bool,
        groups: int,
    ) -> None:
        super().__init__()
        eps = 1e-6 if cross_attention else 1e-5  # the two diffusers classes differ here
        self.resnets = nn.ModuleList(
            [
                SpatioTemporalResBlock(in_ch if i == 0 else out_ch, out_ch, temb_ch, eps, groups)
                for i in range(num_layers)
            ]
        )
        self.attentions = (
            _transformers(num_layers, out_ch, heads, context_dim, transformer_depth, groups)
            if cross_attention
            else None
        )
        self.downsamplers = nn.ModuleList([Downsample(out_ch)]) if add_downsample else None

    def forward(self, x: Tensor, temb: Tensor, context: Tensor, num_frames: int) -> tuple[Tensor, list[Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb, num_frames)
            if self.attentions is not None:
                x = self.attentions[i](x, context, num_frames)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """diffusers `UNetMidBlockSpatioTemporal`: resnet, transformer, resnet."""

    def __init__(
        self, ch: int, temb_ch: int, transformer_depth: int, heads: int, context_dim: int, groups: int
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([SpatioTemporalResBlock(ch, ch, temb_ch, 1e-5, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatioTemporalTransformer(ch, heads, context_dim, transformer_depth, groups)])

    def forward(self, x: Tensor, temb: Tensor, context: Tensor, num_frames: int) -> Tensor:
        x = self.resnets[0](x, temb, num_frames)
        x = self.attentions[0](x, context, num_frames)
        return self.resnets[1](x, temb, num_frames)


class UpBlock(nn.Module):
    """diffusers `CrossAttnUpBlockSpatioTemporal` (cross_attention) or `UpBlockSpatioTemporal`.

    Resnet i takes the running features concatenated with one skip connection: the last resnet's skip comes from the
    next-shallower down block (`skip_ch`), the others from the matching down block (`out_ch`).
    """

    def __init__(
        self,
        prev_ch: int,
        skip_ch: int,
        out_ch: int,
        temb_ch: int,
        num_layers: int,
        cross_attention: bool,
        transformer_depth: int,
        heads: int,
        context_dim: int,
        add_upsample: bool,
        groups: int,
    ) -> None:
        super().__init__()
        resnets = []
        for i in range(num_layers):
            res_in = prev_ch if i == 0 else out_ch
            res_skip = skip_ch if i == num_layers - 1 else out_ch
            resnets.append(SpatioTemporalResBlock(res_in + res_skip, out_ch, temb_ch, 1e-6, groups))
        self.resnets = nn.ModuleList(resnets)
        self.attentions = (
            _transformers(num_layers, out_ch, heads, context_dim, transformer_depth, groups)
            if cross_attention
            else None
        )
        self.upsamplers = nn.ModuleList([Upsample(out_ch)]) if add_upsample else None

    def forward(
        self,
        x: Tensor,
        skips: list[Tensor],
        temb: Tensor,
        context: Tensor,
        num_frames: int,
        upsample_size: tuple[int, int] | None,
    ) -> Tensor:
        """skips: this block's skip connections in the order they were produced (consumed last-first, and popped
        from the list as they are: a consumed skip held by the list until the block returns would sit in memory
        through the block's remaining resnets; eager runs only, compiled graphs plan their own buffers)."""
        for i, resnet in enumerate(self.resnets):
            x = torch.cat([x, skips.pop()], dim=1)  # (B*F, C, h, w) + (B*F, C_skip, h, w) on channels
            x = resnet(x, temb, num_frames)
            if self.attentions is not None:
                x = self.attentions[i](x, context, num_frames)
        if self.upsamplers is not None:
            assert upsample_size is not None
            x = self.upsamplers[0](x, upsample_size)
        return x


class UNet(Placed):
    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        c = config
        n = len(c.block_out_channels)
        per_block = {
            "down_cross_attention": c.down_cross_attention,
            "up_cross_attention": c.up_cross_attention,
            "layers_per_block": c.layers_per_block,
            "transformer_layers_per_block": c.transformer_layers_per_block,
            "num_attention_heads": c.num_attention_heads,
            "cross_attention_dim": c.cross_attention_dim,
        }
        for name, values in per_block.items():
            if len(values) != n:
                raise ValueError(f"UNetConfig.{name} has {len(values)} entries for {n} blocks")
        self.config = c
        ch = c.block_out_channels
        temb_ch = c.time_embed_dim
        groups = c.norm_num_groups

        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimeEmbedding(ch[0], temb_ch)
        self.add_embedding = TimeEmbedding(c.projection_class_embeddings_input_dim, temb_ch)

        self.down_blocks = nn.ModuleList(
            [
                DownBlock(
                    in_ch=ch[max(i - 1, 0)],
                    out_ch=ch[i],
                    temb_ch=temb_ch,
                    num_layers=c.layers_per_block[i],
                    cross_attention=c.down_cross_attention[i],
                    transformer_depth=c.transformer_layers_per_block[i],
                    heads=c.num_attention_heads[i],
                    context_dim=c.cross_attention_dim[i],
                    add_downsample=i < n - 1,
                    groups=groups,
                )
                for i in range(n)
            ]
        )
        self.mid_block = MidBlock(
            ch[-1],
            temb_ch,
            transformer_depth=c.transformer_layers_per_block[-1],
            heads=c.num_attention_heads[-1],
            context_dim=c.cross_attention_dim[-1],
            groups=groups,
        )

        # Up block i mirrors down block n-1-i: per-block settings are read reversed (as diffusers does).
        rch = ch[::-1]
        self.up_blocks = nn.ModuleList(
            [
                UpBlock(
                    prev_ch=rch[max(i - 1, 0)],
                    skip_ch=rch[min(i + 1, n - 1)],
                    out_ch=rch[i],
                    temb_ch=temb_ch,
                    num_layers=c.layers_per_block[n - 1 - i] + 1,
                    cross_attention=c.up_cross_attention[i],
                    transformer_depth=c.transformer_layers_per_block[n - 1 - i],
                    heads=c.num_attention_heads[n - 1 - i],
                    context_dim=c.cross_attention_dim[n - 1 - i],
                    add_upsample=i < n - 1,
                    groups=groups,
                )
                for i in range(n)
            ]
        )
        self.conv_norm_out = nn.GroupNorm(groups, ch[0], eps=1e-5)
        self.conv_out = nn.Conv2d(ch[0], c.out_channels, 3, padding=1)

    def forward(
        self,
        sample: Tensor,
        timestep: Tensor | float,
        encoder_hidden_states: Tensor,
        added_time_ids: Tensor,
        return_dict: bool = True,
    ) -> SampleOutput | tuple[Tensor]:
        """sample: (B, F, in_channels, h, w); timestep: a number, () or (B,) c_noise; encoder_hidden_states: (B, S,
        D) (S = 1 for SVD's CLIP embedding); added_time_ids: (B, 3). The (B, F, out_channels, h, w) prediction, as
        diffusers' model returns it: `.sample` of a SampleOutput, or `(sample,)` with return_dict=False, so its
        custom denoising loops run unchanged.

        The frame count comes from `sample`, not from the config.
        """
        x = self._predict(sample, torch.as_tensor(timestep), encoder_hidden_states, added_time_ids)
        return SampleOutput(x) if return_dict else (x,)

    def _predict(
        self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor, added_time_ids: Tensor
    ) -> Tensor:
        b, f = sample.shape[:2]
        cfg = self.config
        if encoder_hidden_states.shape[0] != b:  # one context per video, not per frame (diffusers repeats it itself)
            raise ValueError(f"encoder_hidden_states has batch {encoder_hidden_states.shape[0]}, sample has {b}")

        # Conditioning vector: sinusoids in float32, MLPs in the weights' dtype, one row per video.
        t = timestep.to(sample.device).reshape(-1).expand(b)  # () or (B,) -> (B,)
        emb = self.time_embedding(timestep_embedding(t, cfg.block_out_channels[0]))
        ids = timestep_embedding(added_time_ids.flatten(), cfg.addition_time_embed_dim)  # (B*3, A)
        emb = emb + self.add_embedding(ids.reshape(b, -1))  # (B*3, A) -> (B, 3*A)
        # Every resnet starts with silu(temb): do it once. One row per frame: (B, T) -> (B*F, T).
        temb = F.silu(emb)[:, None].expand(b, f, emb.shape[-1]).reshape(b * f, emb.shape[-1])

        x = self.conv_in(sample.flatten(0, 1))  # (B, F, C, h, w) -> (B*F, C, h, w)

        skips = [x]
        for down in self.down_blocks:
            x, block_skips = down(x, temb, encoder_hidden_states, f)
            skips.extend(block_skips)

        x = self.mid_block(x, temb, encoder_hidden_states, f)

        for up in self.up_blocks:
            k = len(up.resnets)
            block_skips, skips = skips[-k:], skips[:-k]
            # Upsample to the spatial size of the next block's first skip: forces the right size for odd latents.
            size = tuple(skips[-1].shape[-2:]) if skips else None
            x = up(x, block_skips, temb, encoder_hidden_states, f, size)

        x = self.conv_out(group_norm(x, self.conv_norm_out, silu=True, reuse_input=True))
        return x.reshape(b, f, *x.shape[1:])  # (B*F, C, h, w) -> (B, F, C, h, w)

    def to_channels_last(self) -> UNet:
        """Store conv weights channels-last (NHWC, and NDHWC for the temporal convs); activations then follow."""
        channels_last_(self)
        return self

    def enable_forward_chunking(self, chunk_size: int | None = None, dim: int = 0) -> None:
        """Run the transformers' feed-forwards in slices as small as `chunk_size` (default 1) entries of `dim`
        (0: batch*frames, 1: tokens; temporal blocks count frames, as in diffusers) to cut peak memory. Each slice
        is cut as contiguous rows holding that many tokens (fast matrix products, see `_feed_forward`). Numbers
        are unchanged: the feed-forward is per token."""
        if dim not in (0, 1):
            raise ValueError(f"forward chunking dim must be 0 or 1, not {dim}")
        self._set_chunking(chunk_size or 1, dim)

    def disable_forward_chunking(self) -> None:
        self._set_chunking(None, 0)

    def _set_chunking(self, chunk_size: int | None, dim: int) -> None:
        for m in self.modules():
            if isinstance(m, (SpatialTransformerBlock, TemporalTransformerBlock)):
                m.set_chunk_feed_forward(chunk_size, dim)
