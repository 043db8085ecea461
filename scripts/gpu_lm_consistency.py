"""Teacher-forced logits of the tiny LM against its generation path (prefill of a prompt,
then cached decode of the next tokens), on the GPU: the two must agree (same model, same
tokens). Random model with the passkey-gpu shapes (hidden 256, HQ=4, H=1, d_k=64, l=32,
d=16, l'=64, n=8, w=256) and random gate weights.

    python scripts/gpu_lm_consistency.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> None:
    import torch

    from nsa import NSAConfig
    from nsa.model import TinyLM

    cfg = NSAConfig(hidden_size=256, n_heads=4, n_kv_heads=1, d_k=64, d_v=64, l=32, d=16,
                    l_sel=64, n=8, n_initial=1, n_local=2, w=256)
    print(torch.cuda.get_device_name())
    for backend in ("reference", "triton"):
        for dtype in (torch.float32, torch.bfloat16):
            for T in (1024, 4096):
                torch.manual_seed(0)
                m = TinyLM(cfg, n_layers=2, attention="nsa", backend=backend).cuda().eval()
                for blk in m.blocks:
                    torch.nn.init.normal_(blk.attn.gate[-1].weight, std=0.5)
                    torch.nn.init.normal_(blk.attn.q_proj.weight, std=0.3)
                m = m.to(dtype)
                g = torch.Generator(device="cuda").manual_seed(1)
                x = torch.randint(0, 256, (4, T), generator=g, device="cuda")
                first = T - 8
                with torch.no_grad():
                    full = m(x).float()
                    caches = m.new_caches(4, max_len=T + 4)
                    lg = [m(x[:, :first], caches=caches)[:, -1].float()]
                    for i in range(first, first + 5):
                        lg.append(m.decode(x[:, i], caches).float())
                    diffs, agree = [], []
                    for k, lo in enumerate(lg):
                        ref = full[:, first - 1 + k]
                        diffs.append((lo - ref).abs().max().item() / ref.abs().max().item())
                        agree.append((lo.argmax(-1) == ref.argmax(-1)).float().mean().item())
                print(f"{backend:9s} {str(dtype):14s} T={T}: max rel diff per step "
                      + " ".join(f"{d:.1e}" for d in diffs) + f"; argmax agree {agree}",
                      flush=True)


if __name__ == "__main__":
    main()
