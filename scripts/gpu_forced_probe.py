"""What the blocks shared by neighbouring positions cost the selected branch (a bound).

    python scripts/gpu_forced_probe.py                  # T = 16k, 64k; G = 16
    python scripts/gpu_forced_probe.py --smoke          # CPU interpreter, tiny shapes

Paper shape (H=4, HQ=64, d=128, bf16, l=32, d=16, l'=64, n=16, w=512), block indices from
the kernels' own selection on random inputs. For aligned tiles of 2 and 4 positions it
counts the blocks every position of the tile selected (on random data: the forced initial
and local blocks), then times the selected forward (with the gate combine) and the
selected dQ on three index sets: as selected; without the blocks the tile shares (each
row compacted, -1 last); only the shared blocks. "all - shared + shared / P" bounds what
loading each shared block once per tile of P positions could reach. The tiles themselves
(commit c03fd5a, ``sel_forward(share=...)``) measured slower: docs/perf-notes.md.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from script_modules import load_script  # noqa: E402


def _check_forward():
    return load_script("gpu_check_forward")


def shared_mask(idx, P):
    """[B, T, H, n] bool: entry present in every row of its aligned tile of P positions."""
    import torch

    B, T, H, n = idx.shape
    Tp = T - T % P
    tiles = idx[:, :Tp].reshape(B, Tp // P, P, H, n)
    ok = torch.ones_like(tiles, dtype=torch.bool)
    for p in range(P):
        other = tiles[:, :, p]  # [B, T/P, H, n]
        ok &= (tiles.unsqueeze(-1) == other.unsqueeze(2).unsqueeze(-2)).any(-1)
    ok &= tiles >= 0
    out = torch.zeros_like(idx, dtype=torch.bool)
    out[:, :Tp] = ok.reshape(B, Tp, H, n)
    return out


def compact(idx, keep):
    """Rows of ``idx`` with only the ``keep`` entries, ascending, -1 last."""
    import torch

    big = torch.iinfo(torch.int32).max
    x = torch.where(keep & (idx >= 0), idx, torch.full_like(idx, big))
    x = torch.sort(x, dim=-1).values
    return torch.where(x == big, torch.full_like(x, -1), x).contiguous()


def time_set(cf, q, inp, ix, cfg, scale, gate, dout, dq, o_cmp, o_win):
    """(selected forward + combine, selected dQ) median ms on the index set ``ix``."""
    import torch

    from nsa.ops.selection import sel_forward
    from nsa.ops.selection.bwd_launch import sel_backward

    k, v = inp["k_sel"], inp["v_sel"]

    def fwd():
        return sel_forward(q, k, v, ix, cfg, scale, g_sel=gate, o_cmp=o_cmp,
                           g_cmp=inp["g_cmp"], o_win=o_win, g_win=inp["g_win"], mode="group")

    lse = torch.empty(1, q.shape[2], q.shape[1], device=q.device, dtype=torch.float32)
    o_sel = sel_forward(q, k, v, ix, cfg, scale, lse=lse, mode="group")[0]
    delta = (gate.float() * (dout.float() * o_sel.float()).sum(-1)).contiguous()

    def dqf():
        sel_backward(q, k, v, ix, dout, gate, lse, delta, dq, cfg, scale, accumulate_dq=False,
                     dq_only=True, mode="group")

    return cf.bench(fwd), cf.bench(dqf)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--Ts", default="16384,65536")
    ap.add_argument("--G", type=int, default=16)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    cf = _check_forward()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        cf.DEVICE = "cpu"
    import torch

    from nsa import NSAConfig
    from nsa.ops.window import win_forward

    cfg = NSAConfig(l=32, d=16, l_sel=64, n=16, n_initial=1, n_local=2, w=512)
    H, d, G = 4, 128, args.G
    Ts = [int(x) for x in args.Ts.split(",")]
    if args.smoke:
        cfg = NSAConfig(l=32, d=16, l_sel=64, n=4, n_initial=1, n_local=2, w=64)
        Ts, H, d, G = [300], 1, 32, 3
    gpu = torch.cuda.get_device_name() if cf.DEVICE == "cuda" else "cpu (smoke)"
    print(f"GPU: {gpu}; torch {torch.__version__}", flush=True)
    rows = []
    for T in Ts:
        case = cf.selected_case(T, G, H, d, cfg)
        inp, scale, idx, o_cmp = case["inp"], case["scale"], case["idx"], case["o_cmp"]
        q = inp["q"]
        o_win = win_forward(q, inp["k_win"], inp["v_win"], cfg.w, scale)
        valid = (idx >= 0).sum().item()
        sets = {"all": idx}
        for P in (2, 4):
            sh = shared_mask(idx, P)
            frac = sh.sum().item() / valid
            print(f"T={T} P={P}: shared entries {frac:.3f} of the selected "
                  f"({sh.sum().item() / (idx.shape[1] * H):.2f} per row)", flush=True)
            if P == 4:
                sets["no shared"] = compact(idx, ~sh)
                sets["shared only"] = compact(idx, sh)
        dout, gate = case["dout"], inp["g_sel"]
        dq = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
        row = {"T": T}
        for name, ix in sets.items():
            row[name] = time_set(cf, q, inp, ix, cfg, scale, gate, dout, dq, o_cmp, o_win)
            print(f"T={T} {name}: fwd {row[name][0]:.3f} ms, dQ {row[name][1]:.3f} ms",
                  flush=True)
        rows.append(row)
        if cf.DEVICE == "cuda":
            torch.cuda.empty_cache()
    print(f"\n## Selected branch: the cost of blocks shared by 4 neighbouring positions "
          f"({gpu}, bf16, G={G}, median ms)")
    print("| T | kernel | all | no shared | shared only | bound: all - shared*3/4 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        for i, kname in enumerate(("forward+combine", "dQ")):
            a, ns, so = r["all"][i], r["no shared"][i], r["shared only"][i]
            print(f"| {r['T']} | {kname} | {a:.3f} | {ns:.3f} | {so:.3f} | "
                  f"{ns + (a - ns) / 4:.3f} |")


if __name__ == "__main__":
    main()
