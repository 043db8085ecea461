"""Loading helpers shared by the scripts of this folder (not a library module).

* :func:`load_script`: another script of this folder as a module, for its helpers (its
  ``main`` is not run);
* :func:`module_from_source`: a module built from edited source text (a kernel file with
  one function or line replaced), written to a temporary file first because Triton's
  ``@triton.jit`` reads a function's source through ``inspect``.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_script(name: str):
    """scripts/<name>.py as a fresh module."""
    return _load(name, os.path.join(HERE, f"{name}.py"))


def module_from_source(body: str, tag: str):
    """A module whose source is ``body`` (saved under a temporary folder as ``tag``.py)."""
    path = os.path.join(tempfile.mkdtemp(), f"{tag}.py")
    with open(path, "w") as f:
        f.write(body)
    return _load(tag, path)


def resource_usage(compiled) -> tuple[str, str]:
    """(cuobjdump's --dump-resource-usage text, its "REG:n STACK:n" part) of a compiled
    kernel's cubin (``triton.compile(...)``'s result; no GPU needed)."""
    import subprocess

    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        ru = subprocess.run([cuobjdump, "--dump-resource-usage", f.name],
                            capture_output=True, text=True).stdout
    return ru, " ".join(x for x in ru.split() if x.split(":")[0] in ("REG", "STACK"))
