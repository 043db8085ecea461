"""The env case: the device a run uses and the backends it requires, as checks."""

from __future__ import annotations

from typing import Any

import torch

from nsa import policy
from nsa.backends import BACKEND_SPECS, device_info
from nsabench.env import default_case
from nsabench.suites import CaseSpec


def run(spec: CaseSpec, device: torch.device) -> dict[str, Any]:
    dev = device_info(device)
    dtype, shapes = default_case(dev)
    routing = policy.route(dev, dtype, shapes)
    m: dict[str, Any] = {
        "device_name": dev.describe(),
        "torch": torch.__version__,
        "routing": "; ".join(routing.lines()),
    }
    for name in spec.params["require_backends"]:
        why = BACKEND_SPECS[name].not_supported_reasons(dev, dtype, shapes)
        m[f"backend_{name}_usable"] = not why
        if why:
            m[f"backend_{name}_reasons"] = "; ".join(why)
    return m
