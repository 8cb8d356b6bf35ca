"""``transformer``: a decoder-only transformer over the flattened code grid.

The codes of one image, ``(h, w)``, are read in raster order as a sequence of
``L = h * w`` tokens. The input at position ``t`` is the embedding of code ``t - 1``
(position 0 gets a start embedding: the class embedding when the prior is
class-conditional, else one learned start vector) plus a learned position embedding;
pre-norm blocks of causal self-attention
(:func:`torch.nn.functional.scaled_dot_product_attention`) and an MLP follow; a linear
head gives the logits of code ``t``. This is the prior of taming-transformers
(minGPT) with the class as its start token.

Sampling keeps the keys and values of every layer in a cache, so each new token costs
one attention over the tokens before it (O(L) per token, not O(L^2)); it draws the same
codes as recomputing the whole prefix at every token (:meth:`Prior.sample`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from vqkit import hookimpl
from vqkit.interfaces import Params, Prior


class TransformerPriorParams(Params):
    dim: int = Field(256, ge=8, description="width of the token embeddings and of every layer")
    layers: int = Field(4, ge=1, description="transformer blocks")
    heads: int = Field(4, ge=1, description="attention heads (must divide dim)")
    mlp_ratio: float = Field(4.0, gt=0, description="hidden width of each MLP / dim")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on attention, MLP and embeddings")

    @model_validator(mode="after")
    def _check(self) -> "TransformerPriorParams":
        if self.dim % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide dim ({self.dim})")
        return self


class KVCache:
    """Keys and values of every layer for ``batch`` sequences of up to ``length`` tokens:
    float ``(layers, batch, heads, length, dim/heads)`` each, filled position by position."""

    def __init__(self, layers: int, batch: int, heads: int, length: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (layers, batch, heads, length, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)


class _Block(nn.Module):
    def __init__(self, p: TransformerPriorParams):
        super().__init__()
        self.heads = p.heads
        self.dropout = p.dropout
        self.norm1 = nn.LayerNorm(p.dim)
        self.qkv = nn.Linear(p.dim, 3 * p.dim)
        self.proj = nn.Linear(p.dim, p.dim)
        self.norm2 = nn.LayerNorm(p.dim)
        hidden = max(1, int(round(p.dim * p.mlp_ratio)))
        self.mlp = nn.Sequential(nn.Linear(p.dim, hidden), nn.GELU(), nn.Linear(hidden, p.dim))
        self.drop = nn.Dropout(p.dropout)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=-1)
        shape = (b, t, self.heads, d // self.heads)
        return (q.view(shape).transpose(1, 2), k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2))

    def _out(self, x: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = att.shape
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(b, t, -1)))
        return x + self.drop(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(x)
        att = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self._out(x, att)

    def step(self, x: torch.Tensor, cache: KVCache, layer: int, pos: int) -> torch.Tensor:
        """``x`` ``(B, 1, dim)`` at position ``pos``: store its key and value, attend over
        positions ``0..pos``."""
        q, k, v = self._qkv(x)
        cache.k[layer, :, :, pos] = k[:, :, 0]
        cache.v[layer, :, :, pos] = v[:, :, 0]
        att = F.scaled_dot_product_attention(q, cache.k[layer, :, :, : pos + 1], cache.v[layer, :, :, : pos + 1])
        return self._out(x, att)


class TransformerPrior(Prior):
    """Decoder-only transformer over raster-ordered codes (causal SDPA, KV-cached sampling)."""

    Params = TransformerPriorParams

    def __init__(self, params: TransformerPriorParams | None = None, *, codebook_size: int,
                 grid: tuple[int, ...] | list[int], num_classes: int = 0):
        super().__init__()
        self.params = p = params or self.Params()
        self.codebook_size = int(codebook_size)
        self.grid = tuple(int(g) for g in grid)
        self.num_classes = int(num_classes)
        if self.codebook_size < 1 or not self.grid or min(self.grid) < 1 or self.num_classes < 0:
            raise ValueError(f"bad prior shape: codebook_size={codebook_size}, grid={grid}, "
                             f"num_classes={num_classes}")
        self.tok = nn.Embedding(self.codebook_size, p.dim)
        self.start = nn.Embedding(max(1, self.num_classes), p.dim)
        self.pos = nn.Parameter(torch.zeros(self.length, p.dim))
        self.drop = nn.Dropout(p.dropout)
        self.blocks = nn.ModuleList(_Block(p) for _ in range(p.layers))
        self.norm = nn.LayerNorm(p.dim)
        self.head = nn.Linear(p.dim, self.codebook_size, bias=False)
        self.apply(self._init)
        nn.init.normal_(self.pos, std=0.02)
        for blk in self.blocks:  # GPT-2: residual projections scaled with depth
            nn.init.normal_(blk.proj.weight, std=0.02 / math.sqrt(2 * p.layers))

    @classmethod
    def example_params(cls, workdir=None) -> TransformerPriorParams:
        """Small params for contract checks and tests (dropout on, to check eval sampling)."""
        return cls.Params(dim=32, layers=2, heads=2, dropout=0.1)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def _start(self, n: int, labels: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        if self.num_classes > 0:
            if labels is None:
                raise ValueError("this prior is class-conditional: labels (B,) are required")
            labels = labels.to(device=device, dtype=torch.int64).reshape(-1)
            if labels.shape[0] != n:
                raise ValueError(f"got {labels.shape[0]} labels for {n} sequences")
            if int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
                raise ValueError(f"labels must be in [0, {self.num_classes}), got {labels.tolist()[:8]}...")
        else:
            labels = torch.zeros(n, dtype=torch.int64, device=device)
        return self.start(labels)[:, None]  # (n, 1, dim)

    def forward(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        n, t = codes.shape
        if not 1 <= t <= self.length:
            raise ValueError(f"codes must be (B, L) with 1 <= L <= {self.length}, got {tuple(codes.shape)}")
        x = torch.cat([self._start(n, labels, codes.device), self.tok(codes[:, :-1])], dim=1)
        x = self.drop(x + self.pos[:t])
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)).float()

    def new_cache(self, batch: int) -> KVCache:
        p = self.params
        ref = self.pos
        return KVCache(p.layers, batch, p.heads, self.length, p.dim // p.heads, ref.device, ref.dtype)

    def step(self, x: torch.Tensor, cache: KVCache, pos: int) -> torch.Tensor:
        """Logits ``(B, K)`` of position ``pos`` from its input embedding ``x`` ``(B, 1, dim)``
        (start or previous code, without position), using and extending ``cache``."""
        x = x + self.pos[pos]
        for i, blk in enumerate(self.blocks):
            x = blk.step(x, cache, i, pos)
        return self.head(self.norm(x))[:, 0].float()

    @torch.no_grad()
    def sample(self, n: int, labels: torch.Tensor | None = None, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        was_training = self.training
        self.eval()
        try:
            device = self.pos.device
            cache = self.new_cache(n)
            codes = torch.empty((n, self.length), dtype=torch.int64, device=device)
            x = self._start(n, labels, device)
            for t in range(self.length):
                nxt = self._draw(self.step(x, cache, t), temperature, top_k, top_p, generator)
                codes[:, t] = nxt
                x = self.tok(nxt)[:, None]
        finally:
            self.train(was_training)
        return codes.reshape(n, *self.grid)


@hookimpl
def vqkit_register_priors(register):
    register("transformer", TransformerPrior)
