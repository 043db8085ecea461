"""Generate: tokens per second of the tiny LM (nsa.model.TinyLM) generating greedily after
a prompt, NSA attention against dense attention, same sizes, same run.

Each model is built from the same seed, prefilled with the same random prompt, then
decodes ``new`` tokens one at a time (the timed part, in CHUNKS synchronised chunks;
tokens/s of the median chunk). NSA runs eagerly and, on CUDA with ``graph``, by replaying a
CUDA-graph-captured step (``nsa.graph.GraphedDecode`` over static caches); the dense
model runs eagerly only: its cache length is a host-side size, so a step cannot be
captured. Warm-up steps (compilation, the graphs of a step with and without a compressed
token) come before the timed steps and are not counted.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from nsa import NSAConfig
from nsa.backends import to_dtype
from nsabench.runners.common import CaseSkip, all_finite, sync
from nsabench.suites import CaseSpec

# the timed steps run in this many chunks; tokens/s comes from the median chunk, so a
# one-time stall (seen once on an H200: a first case at half its later speed) does not
# decide the figure
CHUNKS = 4


def tokens_per_s(model, prompt: torch.Tensor, new: int, graph: bool,
                 device: torch.device) -> tuple[float, torch.Tensor, bool]:
    """(tokens/s of the median chunk of the ``new`` timed steps, the generated tokens
    [B, new], last logits finite)."""
    from nsa.graph import GraphedDecode

    warm = 4 + 2 * model.config.d
    caches = model.new_caches(prompt.shape[0], max_len=prompt.shape[1] + warm + new + 1,
                              static=graph)
    with torch.no_grad():
        logits = model(prompt, caches=caches)[:, -1]
        if graph:
            step = GraphedDecode(lambda t: model.decode(t, caches), caches,
                                 weights_token=model.decode_weights_token)
        else:
            step = lambda t: model.decode(t, caches)  # noqa: E731
        tok = logits.argmax(-1)
        for _ in range(warm):
            tok = step(tok).argmax(-1)
        sync(device)
        out, times = [], []
        chunk = -(-new // CHUNKS)
        for lo in range(0, new, chunk):
            t0 = time.perf_counter()
            for _ in range(min(chunk, new - lo)):
                logits = step(tok)
                tok = logits.argmax(-1)
                out.append(tok)
            sync(device)
            times.append((time.perf_counter() - t0) / (len(out) - lo))
        finite = all_finite(logits)
    return prompt.shape[0] / statistics.median(times), torch.stack(out, 1), finite


def run(spec: CaseSpec, device: torch.device) -> dict[str, Any]:
    from nsa.model import TinyLM

    p = spec.params
    dtype = to_dtype(p["dtype"])
    if dtype == torch.float64:
        raise CaseSkip("generate times float16/bfloat16/float32 models")
    cfg = NSAConfig(
        hidden_size=p["hidden"], n_heads=p["H"] * p["G"], n_kv_heads=p["H"], d_k=p["d_k"],
        d_v=p["d_v"] or p["d_k"], phi=p["phi"], l=p["l"], d=p["d"], l_sel=p["l_sel"],
        n=p["n"], n_initial=p["n_initial"], n_local=p["n_local"], w=p["w"],
    )
    gen = torch.Generator(device="cpu").manual_seed(p["seed"])
    prompt = torch.randint(0, 256, (p["B"], p["context"]), generator=gen).to(device)
    m: dict[str, Any] = {"backend": p["backend"]}
    runs = [("dense_eager", "dense", False), ("nsa_eager", "nsa", False)]
    if p["graph"] and device.type == "cuda":
        runs.append(("nsa_graph", "nsa", True))
    elif p["graph"]:
        m["graph"] = "not run: CUDA graphs need a CUDA device"
    toks, finite = {}, True
    for name, attention, graph in runs:
        torch.manual_seed(p["seed"])
        model = TinyLM(cfg, n_layers=p["layers"], attention=attention,
                       backend=p["backend"]).to(device=device, dtype=dtype).eval()
        m[f"{name}_tok_s"], toks[name], ok = tokens_per_s(model, prompt, p["new"], graph,
                                                           device)
        finite = finite and ok
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    m["speedup_eager"] = m["nsa_eager_tok_s"] / m["dense_eager_tok_s"]
    if "nsa_graph" in toks:
        m["graph_vs_dense_eager"] = m["nsa_graph_tok_s"] / m["dense_eager_tok_s"]
        # the same model eagerly and from the graph: greedy tokens agree unless bf16
        # rounding of a different GEMM kernel under capture flips a near tie
        m["graph_token_match"] = (toks["nsa_graph"] == toks["nsa_eager"]).double().mean().item()
    m["finite"] = finite
    return m
