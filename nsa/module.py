"""NSAAttention: the NSA layer for decoder-only Transformers.

Projections: q; separate k/v per branch (cmp, sel, win; ``share_kv`` uses one pair);
RoPE on q and on every key (phi sees position-encoded keys, as the spec says); phi
compresses cmp-branch keys/values ("mlp": learned intra-block position embedding +
two-layer MLP, weights shared across KV heads; or "mean"); a gate MLP with sigmoid whose
last layer starts at zero (all gates 0.5 at init); output projection.

Use ``forward(x)`` for training/prefill without a cache, ``prefill(x, cache)`` to also
fill a decode cache, and ``decode(x_t, cache)`` for one new token per sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nsa.cache import NSACache
from nsa.config import NSAConfig
from nsa.graph import GraphedDecode
from nsa.ops import nsa_attention
from nsa.ops.decode import decode_append, nsa_decode
from nsa.ops.reference import compress_blocks, compress_mean


def rope_inv_freq(D: int, base: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """[D/2] rotary inverse frequencies base^(-2i/D), in float64 for float64 heads, else
    float32 (the angles of every RoPE in the library, prefill and decode, come from it)."""
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    return base ** (-torch.arange(0, D, 2, device=device, dtype=ct) / D)


def rope_tables_at(pos: Tensor, inv: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles pos * inv (inv from :func:`rope_inv_freq`) at
    positions pos ([T] or [B, T]): [1 or B, T, 1, D/2] in inv's dtype."""
    ang = pos.to(inv.dtype)[..., None] * inv  # [T, D/2] or [B, T, D/2]
    if ang.dim() == 2:
        ang = ang.unsqueeze(0)
    return ang.cos()[:, :, None, :], ang.sin()[:, :, None, :]


def rope_tables(pos: Tensor, D: int, base: float, dtype: torch.dtype,
                device: torch.device) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles for head dim D at positions pos ([T] or [B, T]),
    [1 or B, T, 1, D/2], in float64 for float64 heads, else float32."""
    return rope_tables_at(pos, rope_inv_freq(D, base, dtype, device))


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE of x [B, T, heads, D] with :func:`rope_tables`' cos and sin."""
    D, ct = x.shape[-1], cos.dtype
    x1, x2 = x[..., : D // 2].to(ct), x[..., D // 2:].to(ct)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def rope(x: Tensor, pos: Tensor, base: float) -> Tensor:
    """Rotary position embedding (rotate-half form). x [B, T, heads, D], pos [T] or [B, T]."""
    return apply_rope(x, *rope_tables(pos, x.shape[-1], base, x.dtype, x.device))


def _param_key(params: list[Tensor]) -> tuple:
    """Identity of parameters' current values: storage, in-place version, dtype."""
    return tuple((p.data_ptr(), p._version, p.dtype) for p in params)


class Compressor(nn.Module):
    """phi: raw tokens [B, T, H, D] -> compressed tokens [B, N, H, D] (block l, stride d)."""

    def __init__(self, config: NSAConfig, dim: int) -> None:
        super().__init__()
        self.l, self.d, self.kind = config.l, config.d, config.phi
        if self.kind == "mlp":
            self.pos = nn.Parameter(torch.randn(config.l, dim) * 0.02)
            self.fc1 = nn.Linear(config.l * dim, config.phi_hidden_size)
            self.fc2 = nn.Linear(config.phi_hidden_size, dim)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "mean":
            return compress_mean(x, self.l, self.d)
        blocks = compress_blocks(x, self.l, self.d) + self.pos  # [B, N, H, l, D]
        return self.fc2(F.gelu(self.fc1(blocks.flatten(-2))))


class NSAAttention(nn.Module):
    def __init__(self, config: NSAConfig, backend: str = "auto") -> None:
        super().__init__()
        self.config = config
        self.backend = backend
        if backend != "reference":
            from nsa.ops import load_backend

            load_backend(backend)  # import kernels now, not inside a compiled forward
        c = config
        HQ, H, dk, dv, hid = c.n_heads, c.n_kv_heads, c.d_k, c.d_v, c.hidden_size
        self.q_proj = nn.Linear(hid, HQ * dk, bias=False)
        names = ("shared",) if c.share_kv else ("cmp", "sel", "win")
        self.k_proj = nn.ModuleDict({b: nn.Linear(hid, H * dk, bias=False) for b in names})
        self.v_proj = nn.ModuleDict({b: nn.Linear(hid, H * dv, bias=False) for b in names})
        self.phi_k = Compressor(c, dk)
        self.phi_v = Compressor(c, dv)
        self.gate = nn.Sequential(
            nn.Linear(hid, c.gate_hidden_size), nn.SiLU(), nn.Linear(c.gate_hidden_size, 3 * HQ)
        )
        nn.init.zeros_(self.gate[-1].weight)
        nn.init.zeros_(self.gate[-1].bias)
        self.o_proj = nn.Linear(HQ * dv, hid, bias=False)
        # decode's fused projection (see _decode_projection); False keeps eight GEMMs and
        # torch ops per step (no copy of the projection weights)
        self.fused_decode = True
        self._fused: tuple | None = None
        self._inv_freq: Tensor | None = None

    # ------------------------------------------------------------------ pieces
    def _check_x(self, x: Tensor, what: str) -> None:
        hid = self.config.hidden_size
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != hid:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"NSAAttention.{what}: x must be [B, T, hidden_size={hid}], got {got}")

    def _project(self, x: Tensor, pos: Tensor) -> dict[str, Tensor]:
        """q, per-branch k/v (RoPE applied) and gates for tokens x at positions pos."""
        c = self.config
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, c.n_heads, c.d_k)
        if c.rope:  # one table for q and every key (same positions and head dim)
            tables = rope_tables(pos, c.d_k, c.rope_base, q.dtype, q.device)
            rot = lambda t: apply_rope(t, *tables)  # noqa: E731
        else:
            rot = lambda t: t  # noqa: E731
        out = {"q": rot(q)}
        for b in ("cmp", "sel", "win"):
            if c.share_kv and b != "cmp":  # one projection serves the three branches
                out[f"k_{b}"], out[f"v_{b}"] = out["k_cmp"], out["v_cmp"]
                continue
            key = "shared" if c.share_kv else b
            out[f"k_{b}"] = rot(self.k_proj[key](x).view(B, T, c.n_kv_heads, c.d_k))
            out[f"v_{b}"] = self.v_proj[key](x).view(B, T, c.n_kv_heads, c.d_v)
        g = torch.sigmoid(self.gate(x)).view(B, T, 3, c.n_heads)
        out["g_cmp"], out["g_sel"], out["g_win"] = g.unbind(dim=2)
        return out

    def compress(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """phi over raw cmp-branch keys/values [B, T, H, *] -> compressed [B, N, H, *]."""
        return self.phi_k(k), self.phi_v(v)

    # ------------------------------------------------------------------ prefill / train
    def forward(
        self, x: Tensor, cache: NSACache | None = None, return_aux: bool = False,
        lengths: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, object]:
        """x [B, T, hidden] at positions 0..T-1 -> [B, T, hidden]. With ``cache``, also
        fills it (prefill); the cache must be empty. ``lengths`` [B] marks a right-padded
        ragged batch for the cache (outputs past a sequence's length are padding)."""
        self._check_x(x, "forward")
        c = self.config
        B, T, _ = x.shape
        p = self._project(x, torch.arange(T, device=x.device))
        k_cmp, v_cmp = self.compress(p["k_cmp"], p["v_cmp"])
        res = nsa_attention(
            p["q"], p["k_sel"], p["v_sel"], p["k_win"], p["v_win"], k_cmp, v_cmp,
            p["g_cmp"], p["g_sel"], p["g_win"], config=c, backend=self.backend,
            return_aux=return_aux,
        )
        o, aux = res if return_aux else (res, None)
        if cache is not None:
            cache.prefill(*(p[n].detach() for n in ("k_sel", "v_sel", "k_win", "v_win",
                                                    "k_cmp", "v_cmp")),
                          k_cmp=k_cmp.detach(), v_cmp=v_cmp.detach(), lengths=lengths)
        y = self.o_proj(o.reshape(B, T, c.n_heads * c.d_v))
        return (y, aux) if return_aux else y

    def prefill(self, x: Tensor, cache: NSACache, lengths: Tensor | None = None) -> Tensor:
        return self.forward(x, cache=cache, lengths=lengths)

    # ------------------------------------------------------------------ decode
    def new_cache(
        self, batch: int, max_len: int | None = None, device=None, dtype=None,
        initial_capacity: int = 1024, static: bool = False,
    ) -> NSACache:
        ref = self.q_proj.weight
        return NSACache(
            self.config, batch, max_len=max_len,
            device=ref.device if device is None else device,
            dtype=ref.dtype if dtype is None else dtype, compress=self.compress,
            initial_capacity=initial_capacity, static=static,
        )

    def graph_decoder(self, cache: NSACache) -> GraphedDecode:
        """A CUDA-graph-captured ``decode`` over a static cache: call it with x_t like
        ``decode``; the returned tensor is reused by the next call."""
        return GraphedDecode(lambda x: self.decode(x, cache), [cache],
                             weights_token=self.decode_weights_token)

    def _decode_projection(self) -> tuple[Tensor, Tensor, dict[str, int], int]:
        """(weight, bias, columns, gate column) of one GEMM that gives a decode step every
        projection it needs: q, each branch's key and value (DECODE_COLUMNS order; shared
        keys/values appear once) and the gate's first layer. One launch instead of eight,
        which at batch 1 is most of a step (a graph-captured step of the tiny LM was
        ~450 small kernels). The concatenated copy is rebuilt when a parameter changes
        (in-place update, move, cast); it costs one copy of these weights."""
        c = self.config
        share = c.share_kv
        mats, cols, off = [self.q_proj.weight], {"q": 0}, c.n_heads * c.d_k
        for b in (("shared",) if share else ("cmp", "sel", "win")):
            for kv, proj, D in (("k", self.k_proj, c.d_k), ("v", self.v_proj, c.d_v)):
                mats.append(proj[b].weight)
                for br in (("cmp", "sel", "win") if share else (b,)):
                    cols[f"{kv}_{br}"] = off
                off += c.n_kv_heads * D
        g0 = self.gate[0]
        mats.append(g0.weight)
        params = [*mats, g0.bias]
        key = _param_key(params)
        if self._fused is None or self._fused[0] != key:
            w = torch.cat([m.detach() for m in mats])
            bias = torch.cat([w.new_zeros(off), g0.bias.detach()])
            self._fused = (key, w, bias, cols, off, params)
        return self._fused[1:5]

    def decode_weights_token(self) -> tuple | None:
        """The current state (storage, in-place version) of the parameters the fused decode
        weight was built from. A captured decode graph holds that copy, so GraphedDecode
        keeps the token of its capture and captures again when it changes (an in-place
        update). Cheap enough for every replay (replacing a parameter object breaks a
        captured graph anyway)."""
        return None if self._fused is None else _param_key(self._fused[5])

    def _rope_freqs(self, ref: Tensor) -> Tensor | None:
        c = self.config
        if not c.rope:
            return None
        f = self._inv_freq
        if f is None or f.device != ref.device or f.dtype != (
                torch.float64 if ref.dtype == torch.float64 else torch.float32):
            f = self._inv_freq = rope_inv_freq(c.d_k, c.rope_base, ref.dtype, ref.device)
        return f

    def _decode_fused(self, x: Tensor, cache: NSACache) -> Tensor:
        """decode() as one projection GEMM, the gate MLP, one append launch (RoPE and every
        cache write: nsa.ops.decode.decode_append) and the decode kernels."""
        c = self.config
        B, HQ = x.shape[0], c.n_heads
        w, bias, cols, g_col = self._decode_projection()
        z = F.linear(x[:, 0], w, bias)  # [B, F]
        g = torch.sigmoid(self.gate[2](self.gate[1](z[:, g_col:])))  # [B, 3 HQ]
        q = decode_append(z, cols, cache, self._rope_freqs(z), backend=self.backend)
        o = nsa_decode(q, cache, g[:, :HQ], g[:, HQ:2 * HQ], g[:, 2 * HQ:], c,
                       backend=self.backend)
        return self.o_proj(o.reshape(B, 1, HQ * c.d_v))

    @torch.no_grad()
    def decode(self, x_t: Tensor, cache: NSACache) -> Tensor:
        """One new token per sequence: x_t [B, 1, hidden] (or [B, hidden]) at position
        cache.length -> [B, 1, hidden] (same rank as given). Appends it to the cache."""
        squeeze = x_t.dim() == 2
        x = x_t.unsqueeze(1) if squeeze else x_t
        self._check_x(x, "decode")
        if x.shape[1] != 1:
            raise ValueError(f"NSAAttention.decode: one token per sequence, got T={x.shape[1]}")
        if x.shape[0] != cache.B:
            raise ValueError(f"NSAAttention.decode: x_t batch {x.shape[0]} != cache batch "
                             f"{cache.B}")
        c = self.config
        if (self.fused_decode and self.backend != "reference" and x.dtype == cache.dtype
                and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
                and (x.is_cuda or self.backend == "triton")):
            y = self._decode_fused(x, cache)
            return y[:, 0] if squeeze else y
        p = self._project(x, cache.lengths[:, None])
        cache.append(*(p[n][:, 0] for n in ("k_sel", "v_sel", "k_win", "v_win", "k_cmp",
                                             "v_cmp")))
        o = nsa_decode(p["q"][:, 0], cache, p["g_cmp"][:, 0], p["g_sel"][:, 0],
                       p["g_win"][:, 0], c, backend=self.backend)
        y = self.o_proj(o.reshape(x.shape[0], 1, c.n_heads * c.d_v))
        return y[:, 0] if squeeze else y
