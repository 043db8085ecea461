"""Raw launcher of the compressed-branch kernels (no autograd, no validation beyond shapes).

Also holds the few launch helpers the selection and window launchers share.
"""

from __future__ import annotations

import torch
from torch import Tensor
from triton.runtime.errors import OutOfResources

from nsa.config import NSAConfig
from nsa.ops.compression.kernels import _cmp_fwd_kernel

LOG2E = 1.4426950408889634

CMP_MODES = ("fused", "two_pass")
# block scores through the tensor cores (cmp_forward's score_dot); None: on CUDA for groups
# of at most 4 rows per position. H200, paper shape, 64k, fused kernel: G = 4 4.81 -> 4.42
# ms, G = 1 1.21 -> 1.16, but G = 16 17.39 -> 18.26 (the products cost more there than
# the shuffles they save; scores equal to 7e-8)
CMP_SCORE_DOT: bool | None = None


# ----------------------------------------------------------------------------- shared helpers


def _interpreter_numpy_shim() -> None:
    """Triton's CPU interpreter (3.4 to 3.6) turns scalar tensors into ints with int(array
    of shape (1,)), which numpy >= 2.4 refuses (triton-lang/triton#9171, fixed upstream by
    #9172): every loop with a run-time bound fails. Apply the upstream fix to the interpreter's
    per-launch patch; compiled GPU kernels are not touched."""
    try:
        from triton.runtime import interpreter as _interp
    except Exception:  # pragma: no cover - interpreter absent in this Triton build
        return
    orig = getattr(_interp, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_nsa_numpy_shim", False):
        return

    def index(self):
        return int(self.handle.data.reshape(-1)[0])

    def patched(tensor, *scope):
        # Triton 3.6 patches through a scope object; 3.4 and 3.5 set class attributes
        orig(tensor, *scope)
        if scope:
            scope[0].set_attr(tensor, "__index__", index)
        else:
            tensor.__index__ = index

    patched._nsa_numpy_shim = True
    _interp._patch_lang_tensor = patched


_interpreter_numpy_shim()


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (TRITON_INTERPRET=1, Triton's flag;
    read by nsa.policy, the one place environment variables are read)."""
    from nsa.policy import triton_interpret

    return triton_interpret()


# host-side sizes: triton.cdiv and triton.next_power_of_2 are constexpr functions whose
# every host call goes through Triton's argument unwrapping (~5 us on the development CPU;
# a decode step made ~23 such calls per layer)
def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def head_dim_tile(d: int) -> int:
    """Head dims are padded (and masked) to a power of two >= 16 inside the kernels."""
    return max(16, next_pow2(d))


def head_dim_split(d: int) -> tuple[int, int]:
    """(DK, DK2): a query/key head dim as a tile of DK columns plus a second tile of DK2
    columns at column DK (0: none), each a power of two >= 16, where two tiles cover it
    with fewer padded columns than one: d = 192 is 128 + 64 (one tile: 256, a third
    wasted in every product and load), 96 is 64 + 32, 48 is 32 + 16; powers of two and
    d <= 32 keep one tile. Kernels with a ``DK2`` constexpr compute Q K^T as the sum of
    the two tiles' products."""
    one = head_dim_tile(d)
    if d <= 32 or d == one:
        return one, 0
    lo = one // 2
    rest = max(16, next_pow2(d - lo))
    return (lo, rest) if lo + rest < one else (one, 0)


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """fp32 inputs use 3xTF32 on the GPU (near-fp32 accuracy); half types ignore the flag."""
    return "tf32x3" if dtype == torch.float32 and device.type == "cuda" else "tf32"


def rows_per_position(G: int) -> int:
    """GP2: rows one query position takes in a tile (its G heads, padded to a power of two)."""
    return next_pow2(G)


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) of a CUDA device from the cached probe; (0, 0) for other devices."""
    if device.type != "cuda":
        return (0, 0)
    from nsa.backends import device_info

    return device_info(device).capability


def shrink_on_oor(launch, bm: int, stages: int, min_bm: int):
    """Call ``launch(bm, stages)``; where shared memory runs out (smaller cards, e.g. SM 8.9
    with ~100 KB per block), retry with fewer pipeline stages, then smaller tiles."""
    while True:
        try:
            return launch(bm, stages)
        except OutOfResources:
            if stages > 1:
                stages -= 1
            elif bm // 2 >= min_bm:
                bm //= 2
            else:
                raise


def last_dim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def score_layout_ok(cfg: NSAConfig) -> list[str]:
    """Why the fused block-score epilogue cannot serve this config (empty if it can)."""
    reasons = []
    b = cfg.l_sel // cfg.d
    a = cfg.l // cfg.d
    if b & (b - 1):
        reasons.append(f"l_sel / d = {b} must be a power of two for the Triton block-score "
                       f"kernel (l_sel={cfg.l_sel}, d={cfg.d})")
    if a > b + 1:
        reasons.append(f"l = {cfg.l} must be <= l_sel + d = {cfg.l_sel + cfg.d} for the Triton "
                       f"block-score kernel (a compressed token may touch at most 2 blocks)")
    return reasons


# ----------------------------------------------------------------------------- configs


def _cmp_config(DK: int, DV: int, GP2: int, SEL_B: int, device: torch.device, pass2_only=False,
                DK2: int = 0):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the compressed-branch kernel (``DK2``:
    the head dim's second tile, :func:`head_dim_split`)."""
    if interpreting() or device.type != "cuda":
        bm, bn, warps, stages = 64, 32, 4, 1
    else:
        major, _ = cuda_capability(device)
        big = max(DK, DV)
        # H200, paper shape, T = 64k, fused: 64 x 64 tiles on 4 warps 18.5 ms, 128 x 64 on 8
        # warps 19.8 ms; on sm_90 at G = 16, 128 x 64 on 4 warps with 2 stages 16.36 ms
        # against 17.36 / 17.40 for 64 x 64 with 3 (same run): every program streams the K/V
        # tiles its rows see from L2, so twice the rows per program halve those bytes. With
        # fewer heads per position the rows are more positions (G = 8: 9.88 against 9.68 /
        # 9.81 ms; G = 1 at 16k: 0.121 against 0.092, fewer programs), so 64 rows stay there
        # (the two-pass mode's score kernel keeps its own measured 64 x 128 tile)
        if DK2 and big <= 128:
            # head dim as two tiles (d_k = 192: 128 + 64): 64 query rows (128 would hold
            # [128, 192] of q and the [128, 128] accumulator in registers), 2 stages of 64-key
            # tiles (80 KB at 192 + 128 columns: two programs per SM)
            bm, bn, warps, stages = 64, 64, 4, 2
        elif big <= 128:
            if major >= 9 and GP2 >= 16 and not pass2_only:
                bm, bn, warps, stages = 128, 64, 4, 2
            else:
                bm, bn, warps, stages = 64, 64, 4, 3 if major >= 9 else 2
        else:
            # head dims past 128 (tiles of 256): 128 x 32 on 8 warps held a whole SM's
            # registers (248); 64 x 32 on 4 lets two programs share one (H200, 16k, G = 16:
            # d = 192 2.83 -> 2.59 ms, d = 256 2.90 -> 2.52; scripts/gpu_wide_head_tune.py)
            bm, bn, warps, stages = 64, 32, 4, 2
        if pass2_only and big <= 128:
            bn = 128 if major >= 9 else 64
    bm = max(bm, GP2)
    bn = max(bn, SEL_B, 16)
    return bm, bn, warps, stages


# ----------------------------------------------------------------------------- launcher


def cmp_forward(
    q: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    cfg: NSAConfig,
    scale: float,
    *,
    want_o: bool = True,
    want_scores: bool = True,
    o: Tensor | None = None,
    scores: Tensor | None = None,
    lse: Tensor | None = None,
    mode: str = "fused",
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    use_desc: bool | None = None,
    score_dot: bool | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """Compressed-branch attention and/or the group block scores, in one or two launches.

    q [B, T, HQ, d_k]; k_cmp [B, N, H, d_k]; v_cmp [B, N, H, d_v] (compressed tokens after phi).
    Returns (o_cmp [B, T, HQ, d_v] in q's dtype or None,
             scores [B, H, T, ceil(T / l_sel)] float32 or None).
    Score entries are written at least where they can be nonzero: block j of query t
    whenever one of its visible compressed tokens overlaps it, i.e. j*(l_sel/d) - (l/d - 1)
    < min(N, N_cmp(t)); later entries (0 by definition) may be left unwritten, and
    :func:`nsa.ops.selection.select_topn` never reads them.
    ``o``/``scores`` may be passed preallocated (tests poison them with NaN).
    ``lse``: optional float32 [B, HQ, T] (last dim contiguous) that receives the base-2
    log-sum-exp of every row (+inf where no compressed token is visible), for the backward.
    ``mode``: "fused" runs both passes in one program; "two_pass" hands the log-sum-exp
    through memory to a second launch. ``block_m``/``block_n``/``num_warps``/``num_stages``
    override the launch config of the (first) kernel, for tuning runs. ``use_desc``: read
    key/value tiles through tensor descriptors (None: :func:`nsa.ops.descriptors.resolve_desc`
    decides). ``score_dot``: the Eq. 9 mapping as a tensor-core product of P (fp16 hi/lo
    split) with the overlap matrix, the group sum after it (None: ``CMP_SCORE_DOT``, which
    by default takes it on CUDA for G <= 4).
    """
    from nsa.ops.descriptors import kv_desc, resolve_desc

    if mode not in CMP_MODES:
        raise ValueError(f"cmp_forward: mode must be one of {CMP_MODES}, got {mode!r}")
    q, k_cmp, v_cmp = map(last_dim_contiguous, (q, k_cmp, v_cmp))
    B, T, HQ, d_k = q.shape
    N, H = k_cmp.shape[1], k_cmp.shape[2]
    d_v = v_cmp.shape[-1]
    G = HQ // H
    GP2 = rows_per_position(G)
    (DK, DK2), DV = head_dim_split(d_k), head_dim_tile(d_v)
    SEL_B, SEL_A = cfg.l_sel // cfg.d, cfg.l // cfg.d
    NB = cfg.num_sel_blocks(T)
    if want_scores:
        bad = score_layout_ok(cfg)
        if bad:
            raise ValueError("cmp_forward: " + "; ".join(bad))
    if want_o and o is None:
        o = torch.empty(B, T, HQ, d_v, device=q.device, dtype=q.dtype)
    if want_scores and scores is None:
        scores = torch.empty(B, H, T, NB, device=q.device, dtype=torch.float32)
    if not want_o and not want_scores:
        return None, None
    use_desc = resolve_desc("cmp_forward", use_desc, k_cmp, v_cmp, DK + DK2, DV)
    if score_dot is None:
        score_dot = CMP_SCORE_DOT
    if score_dot is None:
        score_dot = q.device.type == "cuda" and not interpreting() and GP2 <= 4
    bm, bn, warps, stages = _cmp_config(DK, DV, GP2, SEL_B, q.device, DK2=DK2)
    bm, bn = block_m or bm, block_n or bn
    warps, stages = num_warps or warps, num_stages or stages
    prec = dot_precision(q.dtype, q.device)
    qk_scale = scale * LOG2E
    dummy = q.new_empty(1)
    o_arg = o if o is not None else dummy
    dummy32 = q.new_empty(1, dtype=torch.float32)
    s_arg = scores if scores is not None else dummy32
    s_strides = scores.stride()[:3] if scores is not None else (0, 0, 0)
    two = mode == "two_pass" and want_scores
    keep_lse = lse is not None
    if lse is None:
        lse = torch.empty(B, HQ, T, device=q.device, dtype=torch.float32) if two else dummy32
    lse_strides = (lse.stride(0), lse.stride(1)) if (two or keep_lse) else (0, 0)

    def launch(bm_, bn_, warps_, stages_, pass1, pass2, store_lse):
        pp = max(1, bm_ // GP2)
        grid = (cdiv(T, pp), H, B)
        kd, vd = ((kv_desc(k_cmp, N, bn_, DK), kv_desc(v_cmp, N, bn_, DV)) if use_desc
                  else (k_cmp, v_cmp))
        kd2 = kv_desc(k_cmp, N, bn_, DK2) if use_desc and DK2 else kd
        _cmp_fwd_kernel[grid](
            q, kd, kd2, vd, o_arg, lse, s_arg,
            q.stride(0), q.stride(1), q.stride(2),
            k_cmp.stride(0), k_cmp.stride(1), k_cmp.stride(2),
            v_cmp.stride(0), v_cmp.stride(1), v_cmp.stride(2),
            o_arg.stride(0) if o is not None else 0,
            o_arg.stride(1) if o is not None else 0,
            o_arg.stride(2) if o is not None else 0,
            lse_strides[0], lse_strides[1],
            s_strides[0], s_strides[1], s_strides[2],
            T, N, NB, qk_scale,
            G=G, GP2=GP2, PP=pp, BLOCK_N=bn_, DK=DK, DV=DV, D_K=d_k, D_V=d_v,
            CMP_L=cfg.l, CMP_D=cfg.d, SEL_B=SEL_B, SEL_A=SEL_A,
            PASS1=pass1, PASS2=pass2, DO_PV=want_o, STORE_LSE=store_lse,
            DOT_PREC=prec, USE_DESC=use_desc, SCORE_DOT=score_dot, DK2=DK2,
            BJ2=max(16, next_pow2(bn_ // SEL_B + 1)), num_warps=warps_, num_stages=stages_,
        )

    min_bm = max(16, GP2)
    if not two:
        shrink_on_oor(lambda m, st: launch(m, bn, warps, st, True, want_scores, keep_lse),
                      bm, stages, min_bm)
    else:
        shrink_on_oor(lambda m, st: launch(m, bn, warps, st, True, False, True),
                      bm, stages, min_bm)
        bm2, bn2, warps2, stages2 = _cmp_config(DK, DV, GP2, SEL_B, q.device, pass2_only=True,
                                                DK2=DK2)
        bm2, bn2 = block_m or bm2, block_n or bn2
        shrink_on_oor(lambda m, st: launch(m, bn2, warps2, st, False, True, False),
                      bm2, stages2, min_bm)
    return (o if want_o else None), (scores if want_scores else None)
