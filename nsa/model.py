"""A small decoder-only byte-level LM: embedding, N x (RMSNorm + attention + RMSNorm + MLP),
tied output head. ``attention="nsa"`` uses :class:`NSAAttention`; ``"dense"`` uses
:class:`DenseAttention` with the same projections and RoPE, so the two differ only in
the attention rule. Used by the needle and training commands.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from nsa.cache import NSACache
from nsa.config import NSAConfig
from nsa.graph import GraphedDecode
from nsa.module import NSAAttention, apply_rope, rope_tables


@dataclass
class DenseCache:
    """Preallocated K/V cache of one dense layer (grows by doubling when max_len is None).

    Head-major [B, H, cap, D], so a step's keys k[:, :, :t+1] are contiguous per head, the
    layout SDPA's fused kernels read without a copy."""

    k: Tensor  # [B, H, cap, d_k]
    v: Tensor  # [B, H, cap, d_v]
    growable: bool
    length: int = 0

    def ensure(self, needed: int) -> None:
        cap = self.k.shape[2]
        if needed <= cap:
            return
        if not self.growable:
            raise RuntimeError(f"DenseCache: capacity {cap} tokens (max_len) exceeded: the step "
                               f"needs {needed}")
        while cap < needed:
            cap *= 2
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_empty(old.shape[0], old.shape[1], cap, old.shape[3])
            new[:, :, : old.shape[2]] = old
            setattr(self, name, new)


_DECODE_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class DenseAttention(nn.Module):
    """Causal GQA attention with the projections of NSAAttention's selection branch."""

    def __init__(self, config: NSAConfig) -> None:
        super().__init__()
        c = self.config = config
        self.q_proj = nn.Linear(c.hidden_size, c.n_heads * c.d_k, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.n_kv_heads * c.d_k, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.n_kv_heads * c.d_v, bias=False)
        self.o_proj = nn.Linear(c.n_heads * c.d_v, c.hidden_size, bias=False)

    def _qkv(self, x: Tensor, pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c = self.config
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, c.n_heads, c.d_k)
        k = self.k_proj(x).view(B, T, c.n_kv_heads, c.d_k)
        v = self.v_proj(x).view(B, T, c.n_kv_heads, c.d_v)
        if c.rope:  # one table for q and k
            tables = rope_tables(pos, c.d_k, c.rope_base, q.dtype, q.device)
            q, k = apply_rope(q, *tables), apply_rope(k, *tables)
        return q, k, v

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
        # [B, T, heads, D] -> SDPA layout; equal q/k lengths when causal (is_causal is exact).
        # K/V heads are repeated for the group rather than passed with enable_gqa: with
        # enable_gqa, float32 inputs have no fused kernel and SDPA falls back to the math
        # path, which materialises [B, HQ, T, T] scores (out of memory at 16k x batch 16)
        G = q.shape[2] // k.shape[2]
        k, v = (x.repeat_interleave(G, dim=2) if G > 1 else x for x in (k, v))
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
            scale=self.config.scale,
        )
        return o.transpose(1, 2)

    def forward(self, x: Tensor, cache: DenseCache | None = None) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self._qkv(x, torch.arange(T, device=x.device))
        if cache is not None:
            if cache.length:
                raise RuntimeError("DenseAttention.forward: prefill needs an empty cache")
            cache.ensure(T)
            cache.k[:, :, :T] = k.detach().transpose(1, 2)
            cache.v[:, :, :T] = v.detach().transpose(1, 2)
            cache.length = T
        return self.o_proj(self._attend(q, k, v, causal=True).reshape(B, T, -1))

    def new_cache(self, batch: int, max_len: int | None = None, device=None, dtype=None,
                  initial_capacity: int = 1024) -> DenseCache:
        c, ref = self.config, self.q_proj.weight
        cap = max_len or initial_capacity
        kw = {"device": ref.device if device is None else device,
              "dtype": ref.dtype if dtype is None else dtype}
        return DenseCache(torch.empty(batch, c.n_kv_heads, cap, c.d_k, **kw),
                          torch.empty(batch, c.n_kv_heads, cap, c.d_v, **kw),
                          growable=max_len is None)

    @torch.no_grad()
    def decode(self, x_t: Tensor, cache: DenseCache) -> Tensor:
        """x_t [B, 1, hidden] at position cache.length -> [B, 1, hidden]."""
        B = x_t.shape[0]
        t = cache.length
        q, k, v = self._qkv(x_t, torch.tensor([t], device=x_t.device))
        cache.ensure(t + 1)
        cache.k[:, :, t], cache.v[:, :, t] = k[:, 0], v[:, 0]
        cache.length = t + 1
        # one query row over all t+1 cached keys: every key is visible, so no causal mask.
        # cuDNN's attention is left out: it builds a plan for every new key length, about
        # 9 ms of CPU per call on an H200 (profile: scripts/gpu_lm_profile.py), for 12 us
        # of GPU work
        with sdpa_kernel(_DECODE_SDPA):
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), cache.k[:, :, : t + 1], cache.v[:, :, : t + 1],
                scale=self.config.scale, enable_gqa=True,
            ).transpose(1, 2)
        return self.o_proj(o.reshape(B, 1, -1))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


class Block(nn.Module):
    def __init__(self, config: NSAConfig, attention: str, mlp_ratio: int, backend: str) -> None:
        super().__init__()
        h = config.hidden_size
        self.norm1, self.norm2 = RMSNorm(h), RMSNorm(h)
        self.attn: nn.Module = (NSAAttention(config, backend=backend) if attention == "nsa"
                                else DenseAttention(config))
        self.mlp = nn.Sequential(nn.Linear(h, mlp_ratio * h), nn.GELU(),
                                 nn.Linear(mlp_ratio * h, h))

    def forward(self, x: Tensor, cache=None) -> Tensor:
        x = x + self.attn(self.norm1(x), cache=cache)
        return x + self.mlp(self.norm2(x))

    def decode(self, x: Tensor, cache) -> Tensor:
        x = x + self.attn.decode(self.norm1(x), cache)
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    """Byte-level decoder-only LM (vocab 256 by default) with NSA or dense attention."""

    def __init__(self, config: NSAConfig, n_layers: int = 2, vocab_size: int = 256,
                 attention: str = "nsa", mlp_ratio: int = 4, backend: str = "auto") -> None:
        super().__init__()
        if attention not in ("nsa", "dense"):
            raise ValueError(f"TinyLM: attention must be 'nsa' or 'dense', got {attention!r}")
        if n_layers <= 0:
            raise ValueError(f"TinyLM: n_layers must be positive, got {n_layers}")
        self.config, self.attention, self.vocab_size = config, attention, vocab_size
        self.embed = nn.Embedding(vocab_size, config.hidden_size)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = nn.ModuleList(
            [Block(config, attention, mlp_ratio, backend) for _ in range(n_layers)]
        )
        self.norm = RMSNorm(config.hidden_size)
        # plain list (not registered): a captured decode checks these on every replay
        self._nsa_layers = [b.attn for b in self.blocks if isinstance(b.attn, NSAAttention)]

    def _check_tokens(self, tokens: Tensor) -> None:
        if tokens.dtype not in (torch.int64, torch.int32) or tokens.dim() != 2:
            raise ValueError(f"TinyLM: tokens must be an int tensor [B, T], got "
                             f"{tokens.dtype} {tuple(tokens.shape)}")

    def forward(self, tokens: Tensor, caches: list | None = None) -> Tensor:
        """tokens [B, T] -> logits [B, T, vocab]; with ``caches`` (one per layer) prefill."""
        self._check_tokens(tokens)
        x = self.embed(tokens)
        for i, blk in enumerate(self.blocks):
            x = blk(x, cache=None if caches is None else caches[i])
        return self.norm(x) @ self.embed.weight.T

    def loss(self, tokens: Tensor) -> Tensor:
        """Next-token cross-entropy over tokens [B, T]."""
        logits = self(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

    def new_caches(self, batch: int, max_len: int | None = None, static: bool = False
                   ) -> list[NSACache | DenseCache]:
        if static and self.attention != "nsa":
            raise ValueError("TinyLM: static (CUDA-graph) caches need attention='nsa'")
        kw = {"static": True} if static else {}
        return [blk.attn.new_cache(batch, max_len=max_len, **kw) for blk in self.blocks]

    @torch.no_grad()
    def decode(self, token: Tensor, caches: list) -> Tensor:
        """token [B] at the caches' next position -> logits [B, vocab]."""
        x = self.embed(token[:, None])
        for blk, cache in zip(self.blocks, caches, strict=False):
            x = blk.decode(x, cache)
        return (self.norm(x) @ self.embed.weight.T)[:, 0]

    def decode_weights_token(self) -> tuple:
        """Every NSA layer's decode_weights_token (see NSAAttention)."""
        return tuple(a.decode_weights_token() for a in self._nsa_layers)

    @torch.no_grad()
    def generate(self, prompt: Tensor, n_new: int, max_len: int | None = None,
                 cuda_graph: bool = False) -> Tensor:
        """Greedy continuation of prompt [B, P] by n_new tokens -> [B, n_new].

        ``cuda_graph=True`` (NSA on CUDA) captures one decode step in a CUDA graph over
        static caches of max_len (default P + n_new) and replays it."""
        self._check_tokens(prompt)
        if cuda_graph:
            max_len = max_len or prompt.shape[1] + n_new
        caches = self.new_caches(prompt.shape[0], max_len=max_len, static=cuda_graph)
        logits = self(prompt, caches=caches)[:, -1]
        step = (GraphedDecode(lambda tok: self.decode(tok, caches), caches,
                              weights_token=self.decode_weights_token) if cuda_graph
                else (lambda tok: self.decode(tok, caches)))
        out = []
        for _ in range(n_new):
            tok = logits.argmax(-1)
            out.append(tok)
            logits = step(tok)
        return torch.stack(out, dim=1)
