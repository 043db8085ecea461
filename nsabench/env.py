"""Environment and device probe: versions, GPUs, optional packages, backends, routing.

Everything is gathered on demand (nothing at import) and returned as plain JSON data;
``nsa env`` prints it and every run folder stores it as env.json.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any

import torch

import nsa
from nsa import policy
from nsa.backends import BACKEND_SPECS, DeviceInfo, Shapes, device_info, module_status
from nsa.ops.descriptors import describe as describe_variants

ENV_SCHEMA_VERSION = 1
# distribution -> module; fla-core is only the optional `nsa prefill --fla` comparator
OPTIONAL_PACKAGES = {"flash-attn": "flash_attn", "triton": "triton", "fla-core": "fla"}


def default_case(dev: DeviceInfo) -> tuple[str, Shapes]:
    """The case `nsa env` explains routing for: the paper shape (d_k = d_v = 128, G = 16)
    in bfloat16 on a GPU, float32 on the CPU."""
    return ("bfloat16" if dev.type == "cuda" else "float32"), Shapes(d_k=128, d_v=128, G=16)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cuda_available() -> bool:
    try:
        return bool(torch.cuda.is_available())
    except Exception:
        return False


def cuda_unavailable_reason() -> str:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is built without CUDA"
    try:
        n = torch.cuda.device_count()
    except Exception as exc:  # driver problems surface here
        return f"CUDA runtime error: {exc}"
    if n == 0:
        return "no CUDA device visible (driver missing or CUDA_VISIBLE_DEVICES empty)"
    return "CUDA not usable"


def list_devices() -> list[DeviceInfo]:
    """The CPU and every CUDA device torch can use."""
    devs = [device_info("cpu")]
    if cuda_available():
        devs += [device_info(f"cuda:{i}") for i in range(torch.cuda.device_count())]
    return devs


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvml() -> tuple[Any, dict[str, Any]]:
    """(pynvml module or None, system facts or the reason NVML is unavailable)."""
    try:
        import pynvml
    except Exception as exc:
        return None, {"available": False, "reason": f"pynvml not importable: {exc}"}
    try:
        pynvml.nvmlInit()
    except Exception as exc:
        return None, {"available": False, "reason": f"NVML init failed: {exc}"}
    info: dict[str, Any] = {"available": True}
    try:
        drv = pynvml.nvmlSystemGetDriverVersion()
        info["driver"] = drv.decode() if isinstance(drv, bytes) else drv
    except Exception:
        info["driver"] = None
    try:
        v = pynvml.nvmlSystemGetCudaDriverVersion_v2()
        info["cuda_driver"] = f"{v // 1000}.{(v % 1000) // 10}"
    except Exception:
        info["cuda_driver"] = None
    return pynvml, info


def _nvml_gpu(nv: Any, handle: Any) -> dict[str, Any]:
    def get(fn, *args):
        try:
            out = getattr(nv, fn)(handle, *args)
            return out.decode() if isinstance(out, bytes) else out
        except Exception:
            return None

    mem = get("nvmlDeviceGetMemoryInfo")
    cap = get("nvmlDeviceGetCudaComputeCapability")
    power = get("nvmlDeviceGetPowerManagementLimit")
    return {
        "name": get("nvmlDeviceGetName"),
        "uuid": get("nvmlDeviceGetUUID"),
        "capability": f"{cap[0]}.{cap[1]}" if cap else None,
        "memory_total_gib": round(mem.total / 2**30, 2) if mem else None,
        "memory_free_gib": round(mem.free / 2**30, 2) if mem else None,
        "clock_sm_max_mhz": get("nvmlDeviceGetMaxClockInfo", nv.NVML_CLOCK_SM),
        "clock_mem_max_mhz": get("nvmlDeviceGetMaxClockInfo", nv.NVML_CLOCK_MEM),
        "clock_sm_mhz": get("nvmlDeviceGetClockInfo", nv.NVML_CLOCK_SM),
        "clock_mem_mhz": get("nvmlDeviceGetClockInfo", nv.NVML_CLOCK_MEM),
        "power_limit_w": round(power / 1000, 1) if power else None,
    }


def probe_gpus() -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per GPU facts (pynvml where available, torch otherwise) and NVML system facts."""
    nv, nvml_info = _nvml()
    gpus: list[dict[str, Any]] = []
    torch_n = torch.cuda.device_count() if cuda_available() else 0
    for i in range(torch_n):
        props = torch.cuda.get_device_properties(i)
        gpu: dict[str, Any] = {
            "index": i,
            "torch_device": f"cuda:{i}",
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "memory_total_gib": round(props.total_memory / 2**30, 2),
            "source": "torch",
        }
        if nv is not None:
            try:
                uuid = str(getattr(props, "uuid", ""))
                handle = None
                if uuid:
                    try:
                        handle = nv.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
                    except Exception:
                        handle = None
                if handle is None:
                    handle = nv.nvmlDeviceGetHandleByIndex(i)
                extra = _nvml_gpu(nv, handle)
                gpu.update({k: v for k, v in extra.items() if v is not None and k != "name"})
                gpu["source"] = "pynvml+torch"
            except Exception as exc:
                gpu["nvml_error"] = str(exc)
        gpus.append(gpu)
    if nv is not None and torch_n == 0:
        # GPUs NVML sees but torch cannot use (e.g. a CPU-only torch on a GPU box)
        try:
            for i in range(nv.nvmlDeviceGetCount()):
                g = _nvml_gpu(nv, nv.nvmlDeviceGetHandleByIndex(i))
                g.update({"index": i, "torch_device": None, "source": "pynvml",
                          "note": "torch cannot use this GPU: " + cuda_unavailable_reason()})
                gpus.append(g)
        except Exception:
            pass
    if nv is not None:
        try:
            nv.nvmlShutdown()
        except Exception:
            pass
    return gpus, nvml_info


def backend_table(devices: list[DeviceInfo]) -> list[dict[str, Any]]:
    """For each backend, device and branch: usable, or every reason it is not (capability
    reasons, then policy reasons), for the default case of that device."""
    flags = policy.read_flags()
    rows = []
    for spec in BACKEND_SPECS.values():
        install = spec.install_reasons()
        entry: dict[str, Any] = {
            "name": spec.name,
            "description": spec.description,
            "supports": spec.describe_support(),
            "installed": not install,
            "install_reasons": install,
            "devices": {},
        }
        for dev in devices:
            dtype, shapes = default_case(dev)
            branches = {}
            for b in spec.branches:
                why = policy.branch_reasons(spec.name, b, dev, dtype, shapes, flags)
                branches[b] = {"usable": not why, "reasons": why}
            entry["devices"][dev.label] = {
                "case": {"dtype": dtype, "d_k": shapes.d_k, "d_v": shapes.d_v, "G": shapes.G},
                "branches": branches,
            }
        rows.append(entry)
    return rows


def probe() -> dict[str, Any]:
    """The whole environment as JSON data."""
    devices = list_devices()
    gpus, nvml_info = probe_gpus()
    optional = {}
    for dist, module in OPTIONAL_PACKAGES.items():
        why = module_status(module, import_it=(module == "flash_attn"))
        optional[dist] = {
            "installed": why is None,
            "version": _version(dist),
            "reason": why,
        }
    if not optional["flash-attn"]["installed"]:
        optional["flash-attn"]["note"] = ("flash-attn is not installed: no second dense "
                                          "baseline, and cmp/win cannot route to it")
    too_old = BACKEND_SPECS["triton"].version_reasons()
    if too_old:
        optional["triton"]["note"] = "; ".join(too_old)
    main_dev = devices[1] if len(devices) > 1 else devices[0]
    dtype, shapes = default_case(main_dev)
    routing = policy.route(main_dev, dtype, shapes).to_dict()
    flags = policy.read_flags()
    return {
        "schema_version": ENV_SCHEMA_VERSION,
        "python": {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "executable": sys.executable,
        },
        "platform": {
            "system": platform.system(),
            "release": platform.release(),
            "machine": platform.machine(),
            "cpu": _cpu_name(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "versions": {
            "nsa": nsa.__version__,
            "torch": torch.__version__,
            "triton": _version("triton"),
            "cuda_runtime": torch.version.cuda,
            "cudnn": (torch.backends.cudnn.version() if cuda_available() else None),
            "driver": nvml_info.get("driver"),
            "cuda_driver": nvml_info.get("cuda_driver"),
            "nvidia-ml-py": _version("nvidia-ml-py"),
            "flash-attn": optional["flash-attn"]["version"],
        },
        "cuda": {
            "available": cuda_available(),
            "reason": None if cuda_available() else cuda_unavailable_reason(),
            "device_count": torch.cuda.device_count() if cuda_available() else 0,
            "nvml": nvml_info,
        },
        "gpus": gpus,
        "optional": optional,
        "flags": {
            "NSA_TRITON_SEL_FORCE": flags.triton_sel_force,
            "NSA_USE_FA2": flags.use_fa2,
            "TRITON_INTERPRET": flags.triton_interpret,
            "NSA_DEBUG": policy.debug_enabled(),
        },
        "env_vars": {
            name: {"value": value, "default": policy.ENV_VARS[name][0],
                   "meaning": policy.ENV_VARS[name][1]}
            for name, value in policy.env_snapshot().items()
        },
        "policy": [
            {"id": r.id, "backend": r.backend, "branches": list(r.branches), "rule": r.text}
            for r in policy.POLICY
        ],
        "preference": {b: list(order) for b, order in policy.PREFERENCE.items()},
        "backends": backend_table(devices),
        "routing": routing,
        "kernel_variants": {
            "device": main_dev.label,
            "rows": describe_variants(main_dev.type, main_dev.capability,
                                      flags.triton_interpret),
        },
    }


def short_device(env: dict[str, Any], device: str) -> str:
    """"cpu (model)" or "cuda:0 (NVIDIA H100 80GB HBM3, SM 9.0)" from an env dict."""
    if device.startswith("cuda"):
        idx = int(device.split(":")[1]) if ":" in device else 0
        for g in env.get("gpus", []):
            if g.get("index") == idx and g.get("torch_device"):
                return f"{device} ({g['name']}, SM {g['capability']})"
        return device
    return f"cpu ({env.get('platform', {}).get('cpu', '?')})"
