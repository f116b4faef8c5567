"""Model shapes by name: one registry that the engine, the planner and the CLI all read.

A flavor is a plain, frozen description of a Llama-style decoder (dense, or Mixture-of-Experts when
``experts > 0``). ``vocab_size = 0`` means "take the tokenizer's vocabulary", which is how the small
flavors train on byte or character tokenizers; the large flavors carry the vocabulary they were
published with so that the planner can size them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden: int
    vocab_size: int = 0  # 0: from the tokenizer, rounded up to a multiple of 64
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    init_std: float = 0.02
    # Mixture-of-Experts (the planner reads these; the engine's MoE layers come with the EP issue).
    experts: int = 0
    top_k: int = 0
    shared_experts: int = 0
    moe_ffn_hidden: int = 0
    dense_layers: int = 0

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def with_vocab(self, vocab_size: int) -> "ModelArgs":
        return dataclasses.replace(self, vocab_size=vocab_size)

    def num_params(self, *, include_embedding: bool = True) -> int:
        """Exact parameter count of the dense model built by ``apogee.models.llama``."""
        if self.experts:
            raise ValueError("num_params covers dense flavors; the planner counts MoE parameters")
        kv_dim = self.n_kv_heads * self.head_dim
        attn = self.dim * self.dim * 2 + self.dim * kv_dim * 2  # wq, wo, wk, wv
        mlp = 3 * self.dim * self.ffn_hidden
        norms = 2 * self.dim
        per_layer = attn + mlp + norms
        body = self.n_layers * per_layer + self.dim  # final norm
        embed = self.vocab_size * self.dim
        output = 0 if self.tie_embeddings else self.vocab_size * self.dim
        if include_embedding:
            return body + embed + output
        return body + output  # the output projection does FLOPs, the lookup does not

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (PaLM appendix B): 6N + 12 * layers * heads * head_dim * seq.

        N counts the non-embedding parameters plus the output projection, which is a matmul.
        """
        n = self.num_params(include_embedding=False)
        if self.tie_embeddings:
            n += self.vocab_size * self.dim
        return 6 * n + 12 * self.n_layers * self.n_heads * self.head_dim * seq_len


def _llama_ffn(dim: int, multiplier: float = 1.0, multiple_of: int = 256) -> int:
    """SwiGLU hidden size as Llama computes it: 2/3 of 4*dim, scaled, rounded up."""
    hidden = int(multiplier * int(2 * 4 * dim / 3))
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


FLAVORS: dict[str, ModelArgs] = {
    # A few million parameters: the default CPU job and the tests' workhorse.
    "debug": ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_hidden=768, max_seq_len=512),
    # Tiny shape for multi-rank tests (seconds per step even on 8 gloo ranks).
    "tiny": ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=192, max_seq_len=256),
    # nanoGPT's shakespeare-char shape (6 layers, 6 heads, 384 dims, context 256), Llama-style.
    "shakespeare-char": ModelArgs(
        dim=384, n_layers=6, n_heads=6, n_kv_heads=6, ffn_hidden=1024, max_seq_len=256, tie_embeddings=True
    ),
    # Llama 3.2 1B shape.
    "llama-1b": ModelArgs(
        dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_hidden=8192, vocab_size=128256,
        max_seq_len=8192, rope_theta=500000.0, tie_embeddings=True,
    ),
    # Llama 3 (Dubey et al. 2024, Table 3).
    "llama3-8b": ModelArgs(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden=14336, vocab_size=128256,
        max_seq_len=8192, rope_theta=500000.0,
    ),
    "llama3-70b": ModelArgs(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_hidden=28672, vocab_size=128256,
        max_seq_len=8192, rope_theta=500000.0,
    ),
    "llama3-405b": ModelArgs(
        dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_hidden=53248, vocab_size=128256,
        max_seq_len=8192, rope_theta=500000.0,
    ),
    # The 1T GPT of Narayanan et al. 2021 (128 layers, hidden 25600, 160 heads), Llama-style, for planning.
    "dense-1t": ModelArgs(
        dim=25600, n_layers=128, n_heads=160, n_kv_heads=160, ffn_hidden=_llama_ffn(25600), vocab_size=51200,
        max_seq_len=2048,
    ),
}


def get_flavor(name: str) -> ModelArgs:
    try:
        return FLAVORS[name]
    except KeyError:
        known = ", ".join(sorted(FLAVORS))
        raise KeyError(f"unknown model.flavor {name!r}; choose one of: {known}") from None
