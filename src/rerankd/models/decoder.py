"""The Qwen2 and Qwen3 decoders, padding-free: one module for both, told apart by their configs.

Reproduces the decoder of transformers' `Qwen2VLForConditionalGeneration` (Qwen2 with M-RoPE: q/k/v biases,
head_dim = hidden / heads, rotary angles from three position axes) and `Qwen3Model` (modeling_qwen3.py: no q/k/v
biases, an RMSNorm over head_dim on each head's query and key before RoPE, head_dim from the config, plain 1-D
RoPE) for inference on packed sequences: [tokens, hidden] tensors, causal attention per sequence, no padding
anywhere. The final layer computes only the rows a head reads (each sequence's last token, or the rows a caller
names), since every later token's output is never used. Module and parameter names follow the checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels
from .base import between_layers
from .layers import (Packing, RMSNorm, apply_rotary, rotary_cos_sin, row_attention, rowwise, to_device,
                     varlen_attention)


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    attention_bias: bool  # Qwen2: q/k/v biases; Qwen3: none
    qk_norm: bool  # Qwen3: RMSNorm over head_dim on queries and keys, before RoPE
    mrope_section: tuple[int, ...] | None  # Qwen2-VL's M-RoPE bands; None: plain 1-D RoPE

    @classmethod
    def from_dict(cls, d: dict) -> "TextConfig":
        """A Qwen2-VL config (jina-reranker-m0): M-RoPE, q/k/v biases."""
        # transformers >= 4.5x may nest the text fields under text_config; 4.4x keeps them at the top level
        d = {**d, **d.get("text_config", {})}
        section = (d.get("rope_scaling") or d.get("rope_parameters") or {}).get("mrope_section")
        if section is None:
            raise ValueError("rope_scaling.mrope_section (rope_parameters.mrope_section in transformers 5) is missing: "
                             "not a Qwen2-VL config")  # fmt: skip
        cfg = cls._common(d, "Qwen2", head_dim=d["hidden_size"] // d["num_attention_heads"], attention_bias=True,
                          qk_norm=False, mrope_section=tuple(section))  # fmt: skip
        if 2 * sum(section) != cfg.head_dim:
            raise ValueError(f"mrope_section {section} does not cover head_dim {cfg.head_dim} (2 * sum must equal it)")
        return cfg

    @classmethod
    def from_qwen3(cls, d: dict) -> "TextConfig":
        """A Qwen3 config (Qwen3-Reranker, jina-reranker-v3): 1-D RoPE, q/k norms, head_dim given."""
        if d.get("use_sliding_window"):
            raise ValueError("use_sliding_window=true is not supported (Qwen3 rerankers attend to the whole prompt)")
        if d.get("rope_scaling"):
            raise ValueError(f"rope_scaling {d['rope_scaling']} is not supported (plain RoPE only)")
        rope_type = (d.get("rope_parameters") or {}).get("rope_type", "default")
        if rope_type != "default":  # transformers 5 writes plain RoPE as {rope_type: default, rope_theta}
            raise ValueError(f"rope_parameters {d['rope_parameters']} are not supported (plain RoPE only)")
        windowed = sorted({t for t in d.get("layer_types") or [] if t != "full_attention"})
        if windowed:
            raise ValueError(f"layer_types {windowed} are not supported (every layer must be full_attention)")
        return cls._common(d, "Qwen3", head_dim=d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"],
                           attention_bias=bool(d.get("attention_bias", False)), qk_norm=True, mrope_section=None)  # fmt: skip

    @classmethod
    def _common(cls, d: dict, family: str, **fields) -> "TextConfig":
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act={act!r}: only 'silu' ({family}) is supported")
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads", d["num_attention_heads"]),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            # transformers 5 keeps it in rope_parameters (with the rope type), 4.x at the top level
            rope_theta=d.get("rope_theta", (d.get("rope_parameters") or {}).get("rope_theta", 1_000_000.0)),
            max_position_embeddings=d.get("max_position_embeddings", 32768),
            **fields,
        )


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain RoPE: positions [tokens] -> cos, sin [tokens, head_dim] (fp32)."""
    return rotary_cos_sin(positions.float()[:, None] * inv_freq)  # angles [tokens, head_dim / 2]


def mrope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, section: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE: positions [3, tokens] (t, h, w) -> cos, sin [tokens, head_dim].

    Frequency band i of the head takes its angle from axis i % 3, with bands of sizes `section` (the two halves of
    the head share frequencies).
    """
    freqs = positions.float()[..., None] * inv_freq  # [3, tokens, head_dim / 2]
    chunks = freqs.split(list(section), dim=-1)
    return rotary_cos_sin(torch.cat([c[i % 3] for i, c in enumerate(chunks)], dim=-1))  # [tokens, head_dim / 2]


class Attention(nn.Module):
    elementwise = "torch"  # 'avx512': the rotary embedding on rerankd's CPU kernel (layers.use_cpu_elementwise)

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(self, x, cos, sin, pack: Packing, rows: list[int] | None, at: torch.Tensor | None):
        """x [tokens, hidden] -> [tokens, hidden], or [len(at), hidden] for the query rows `at` only (the final
        layer; `rows`: the same indices as a list, None when they are each sequence's last token)."""
        n = x.shape[0]
        k = self._rotated(self.k_proj(x).view(n, self.kv_heads, self.head_dim), "k_norm", cos, sin)  # [tokens, kv, hd]
        v = self.v_proj(x).view(n, self.kv_heads, self.head_dim)
        if at is None:
            q = self._rotated(self.q_proj(x).view(n, self.heads, self.head_dim), "q_norm", cos, sin)  # [tokens, ...]
            o = varlen_attention(q, k, v, pack, causal=True)
        else:
            q = self.q_proj(x[at]).view(-1, self.heads, self.head_dim)
            q = self._rotated(q, "q_norm", cos[at], sin[at])  # [rows, heads, hd]
            o = row_attention(q, k, v, pack, rows)  # a last token sees every key: no mask needed then
        return self.o_proj(o.reshape(o.shape[0], -1))

    def _rotated(self, t: torch.Tensor, norm: str, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Queries or keys [rows, heads, hd] fresh from their projection (Qwen3: their per-head RMSNorm `norm`
        first), rotated; on the CPU kernel in place (nothing else reads them)."""
        if self.qk_norm:
            t = getattr(self, norm)(t)
        if self.elementwise == "avx512":
            return cpu_kernels.rotary_(t, cos, sin)
        return apply_rotary(t, cos, sin)


class MLP(nn.Module):
    elementwise = "torch"  # 'avx512': the SiLU-gated product on rerankd's CPU kernel (layers.use_cpu_elementwise)

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return rowwise(self._forward, x)

    def _forward(self, x):
        if self.elementwise == "avx512":
            return self.down_proj(cpu_kernels.silu_mul_(self.gate_proj(x), self.up_proj(x)))
        h = F.silu(self.gate_proj(x), inplace=True)
        return self.down_proj(h.mul_(self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, delta, cos, sin, pack: Packing, rows: list[int] | None = None, at: torch.Tensor | None = None):
        """The layer's input is x + delta (delta None: x alone); returns (x', delta'), whose sum is its output. Each
        residual sum is made by the norm that reads it (RMSNorm.add: one pass with the norm on the CPU kernel)."""
        x, h = self.input_layernorm.add(x, delta)
        a = self.self_attn(h, cos, sin, pack, rows, at)
        x, h = self.post_attention_layernorm.add(x if at is None else x[at], a)
        return x, self.mlp(h)


class TextModel(nn.Module):
    """The decoder. Named `model` in the checkpoints."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.inv_freq = self.rope_inv_freq()

    def rope_inv_freq(self) -> torch.Tensor:
        """Inverse frequencies of the rotary embedding, on the CPU (a plain tensor, never a checkpoint entry)."""
        hd = self.cfg.head_dim
        return 1.0 / (self.cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float, device="cpu") / hd))

    def hidden_at(
        self, x: torch.Tensor, positions: torch.Tensor, pack: Packing, rows: list[int] | None = None
    ) -> torch.Tensor:
        """x: [tokens, hidden] input embeddings of packed sequences; positions [3, tokens] (M-RoPE) or [tokens].

        Returns the final-norm hidden states of the token rows `rows` (indices into the packed tokens, ascending),
        or of each sequence's last token when rows is None (`pack.heads` where sequences share prefixes): [rows or
        sequences, hidden].
        """
        if self.cfg.mrope_section is not None:
            cos, sin = mrope_cos_sin(positions, self.inv_freq, self.cfg.mrope_section)
        else:
            cos, sin = rope_cos_sin(positions, self.inv_freq)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        last = pack.heads if pack.heads is not None else [end - 1 for end in pack.offsets[1:]]
        at = to_device(torch.tensor(last if rows is None else rows), x.device)
        delta = None
        for layer in self.layers[:-1]:
            between_layers()
            x, delta = layer(x, delta, cos, sin, pack)
        x, delta = self.layers[-1](x, delta, cos, sin, pack, rows, at)  # [rows, hidden]
        return self.norm.add(x, delta)[1]
