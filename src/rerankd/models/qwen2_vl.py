"""Qwen2-VL's vision tower (2x2 patch merger), padding-free; its M-RoPE Qwen2 decoder is rerankd.models.decoder.

Reproduces the vision half of transformers' `Qwen2VLForConditionalGeneration` (modeling_qwen2_vl.py, transformers
4.4x-4.57) for inference on packed images: [patches, dim] tensors, attention per image, no padding anywhere.
Module and parameter names follow the checkpoint so that weights load by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import between_layers
from . import cpu_kernels
from .layers import (LayerNorm, Packing, apply_rotary, onednn_linear, packing, product, rotary_cos_sin, to_device,
                     varlen_attention)


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    embed_dim: int
    num_heads: int
    mlp_ratio: float
    out_dim: int  # `hidden_size` in the checkpoint's vision_config: the decoder's width
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        act = d.get("hidden_act", "quick_gelu")
        if act != "quick_gelu":
            raise ValueError(f"vision_config.hidden_act={act!r}: only 'quick_gelu' (Qwen2-VL) is supported")
        return cls(
            depth=d["depth"],
            embed_dim=d["embed_dim"],
            num_heads=d["num_heads"],
            mlp_ratio=d.get("mlp_ratio", 4),
            out_dim=d["hidden_size"],
            in_channels=d.get("in_channels", d.get("in_chans", 3)),
            patch_size=d.get("patch_size", d.get("spatial_patch_size", 14)),
            temporal_patch_size=d.get("temporal_patch_size", 2),
            spatial_merge_size=d.get("spatial_merge_size", 2),
        )

    @property
    def patch_values(self) -> int:
        """Values in one flattened patch: channels * temporal * patch * patch (3*2*14*14 = 1176)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


# ----------------------------------------------------------------------------------------------- vision tower


class PatchEmbed(nn.Module):
    """The checkpoint's Conv3d with kernel == stride over pre-cut patches, computed as one matmul."""

    uses_onednn = False  # set by layers.use_cpu_gemm when the model's fp32 products run on oneDNN

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Module()
        self.proj.weight = nn.Parameter(
            torch.empty(cfg.embed_dim, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        )

    def forward(self, patches: torch.Tensor) -> torch.Tensor:  # [patches, 1176] -> [patches, embed_dim]
        w = self.proj.weight
        x, w2d = patches.to(w.dtype), w.reshape(w.shape[0], -1)  # [patches, 1176], [embed_dim, 1176]
        return onednn_linear(x, w2d, None) if self.uses_onednn else F.linear(x, w2d)


class VisionAttention(nn.Module):
    elementwise = "torch"  # 'avx512': the rotary embedding on rerankd's CPU kernel (layers.use_cpu_elementwise)

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.embed_dim // cfg.num_heads
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pack: Packing):
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)  # each [patches, heads, head_dim]
        if self.elementwise == "avx512" and q.dtype == torch.float32:  # rotated in place (views nothing else reads)
            q, k = cpu_kernels.rotary_(q, cos, sin), cpu_kernels.rotary_(k, cos, sin)
        else:
            q = apply_rotary(q.float(), cos, sin).to(x.dtype)
            k = apply_rotary(k.float(), cos, sin).to(x.dtype)
        o = varlen_attention(q, k, v, pack, causal=False)  # [patches, heads, head_dim]
        return self.proj(o.reshape(n, -1))


class VisionBlock(nn.Module):
    elementwise = "torch"  # 'avx512': the bias and quick GELU on rerankd's CPU kernel (the norms have their own)

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        hidden = int(cfg.embed_dim * cfg.mlp_ratio)
        self.norm1 = LayerNorm(cfg.embed_dim, eps=1e-6)
        self.norm2 = LayerNorm(cfg.embed_dim, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(cfg.embed_dim, hidden)
        self.mlp.fc2 = nn.Linear(hidden, cfg.embed_dim)

    def forward(self, x, delta, cos, sin, pack: Packing):
        """The block's input is x + delta (delta None: x alone); returns (x', delta'), whose sum is its output: each
        residual sum is made by the norm that reads it (LayerNorm.add: one pass with it on the CPU kernel)."""
        x, h = self.norm1.add(x, delta)
        x, h = self.norm2.add(x, self.attn(h, cos, sin, pack))
        if self.elementwise == "avx512":
            h, b = product(h, self.mlp.fc1)
            h = cpu_kernels.bias_gelu_(h, b, quick=True)
        else:
            h = self.mlp.fc1(h)
            h = h * torch.sigmoid(1.702 * h)  # quick_gelu
        return x, self.mlp.fc2(h)


class PatchMerger(nn.Module):
    """LayerNorm, then each 2x2 group of neighbouring patches (adjacent rows after preprocessing) -> one token."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.group_dim = cfg.embed_dim * cfg.spatial_merge_size**2
        self.ln_q = LayerNorm(cfg.embed_dim, eps=1e-6)
        self.mlp = nn.ModuleList(
            [nn.Linear(self.group_dim, self.group_dim), nn.GELU(), nn.Linear(self.group_dim, cfg.out_dim)]
        )

    def forward(self, x: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
        """x + delta: the last block's output, as VisionBlock returns it (delta None: x alone)."""
        x = self.ln_q.add(x, delta)[1].view(-1, self.group_dim)  # [patches / 4, 4 * embed_dim]
        for layer in self.mlp:
            x = layer(x)
        return x  # [merged tokens, out_dim]


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList([VisionBlock(cfg) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg)
        self.inv_freq = self.rope_inv_freq()

    def rope_inv_freq(self) -> torch.Tensor:
        """Inverse frequencies of the 2-D rotary embedding (theta 1e4 over head_dim / 2), on the CPU."""
        rot_dim = self.cfg.embed_dim // self.cfg.num_heads // 2
        return 1.0 / (10000.0 ** (torch.arange(0, rot_dim, 2, dtype=torch.float, device="cpu") / rot_dim))

    def rotary(self, grids: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [patches, head_dim] for the (row, col) of every patch, in the merge-block order of the patches."""
        m = self.cfg.spatial_merge_size
        pos = []
        for t, h, w in grids:
            rows = torch.arange(h).view(h // m, m, 1, 1).expand(h // m, m, w // m, m).permute(0, 2, 1, 3).flatten()
            cols = torch.arange(w).view(1, 1, w // m, m).expand(h // m, m, w // m, m).permute(0, 2, 1, 3).flatten()
            pos.append(torch.stack([rows, cols], dim=-1).repeat(t, 1))
        pos = to_device(torch.cat(pos), self.inv_freq.device)  # [patches, 2]
        freqs = pos.float()[..., None] * self.inv_freq  # [patches, 2, rot_dim / 2]
        return rotary_cos_sin(freqs.flatten(1))  # angles [patches, head_dim / 2]

    def forward(self, patches: torch.Tensor, grids: list[tuple[int, int, int]], kernel: str) -> torch.Tensor:
        """patches: [all patches of all images, 1176]; kernel: the attention kernel (layers.attention_backend).
        Returns [merged tokens of all images, out_dim]."""
        x = self.patch_embed(patches)
        cos, sin = self.rotary(grids)
        pack = packing((h * w for t, h, w in grids for _ in range(t)), x.device, kernel)  # attention per frame
        delta = None
        for blk in self.blocks:
            between_layers()
            x, delta = blk(x, delta, cos, sin, pack)
        return self.merger(x, delta)
