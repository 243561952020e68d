"""``engine device_query`` and ``engine --version``: what Moka computes on, and which Moka it is.

Caffe's ``device_query`` prints a GPU's properties; Moka runs on the CPU, so it reports the CPU
model, the cores this process may use, the BLAS library numpy calls with its thread count, the
numpy version and Moka's own batch-thread count (``engine.parallel``). The BLAS thread count comes
from ``threadpoolctl`` when it is installed (the count in force now), else from numpy's build
configuration and the usual environment variables.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from pathlib import Path

BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS",
                         "BLIS_NUM_THREADS")


def version() -> str:
    """Moka's version: the installed distribution's, else the source tree's pyproject.toml."""
    try:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version

        return dist_version("moka")
    except PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if pyproject.is_file():
        match = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.MULTILINE)
        if match:
            return match.group(1)
    return "unknown"


def version_line() -> str:
    import google.protobuf
    import numpy as np

    return (f"engine version {version()} (Moka; Python {platform.python_version()}, "
            f"numpy {np.__version__}, protobuf {google.protobuf.__version__})")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what ``platform`` knows)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for key in ("model name", "Hardware", "Processor", "cpu model"):
        match = re.search(rf"^{key}\s*:\s*(.+)$", text, re.MULTILINE)
        if match:
            return match.group(1).strip()
    return platform.processor() or platform.machine() or "unknown"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def blas_info() -> list[dict[str, str]]:
    """One dict per BLAS library in use: ``name``, ``version``, ``threads``, ``source``."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return [_blas_from_numpy_config()]
    import numpy as np  # noqa: F401  (loads numpy's BLAS so threadpoolctl sees it)

    found = [{"name": f"{info.get('internal_api', '?')} ({info.get('prefix', '?')})",
              "version": str(info.get("version") or "?"),
              "threads": str(info.get("num_threads", "?")),
              "source": "threadpoolctl"}
             for info in threadpool_info() if info.get("user_api") == "blas"]
    return found or [_blas_from_numpy_config()]


def _blas_from_numpy_config() -> dict[str, str]:
    import numpy as np

    name, version_ = "unknown", "?"
    try:
        deps = np.show_config(mode="dicts")["Build Dependencies"]  # numpy >= 1.26
        blas = deps.get("blas", {})
        name, version_ = blas.get("name", name), blas.get("version", version_)
    except Exception:  # older numpy: show_config only prints
        pass
    for variable in BLAS_THREAD_VARIABLES:
        if os.environ.get(variable):
            threads = f"{os.environ[variable]} (from {variable})"
            break
    else:
        threads = (f"up to {usable_cores()} (the library's default; install threadpoolctl to "
                   "see the count in force)")
    return {"name": name, "version": version_, "threads": threads,
            "source": "numpy build configuration"}


def device_report() -> list[str]:
    """The lines ``engine device_query`` logs."""
    import numpy as np

    from engine import parallel

    lines = ["Device: CPU (Moka computes on the CPU only)",
             f"CPU model: {cpu_model()}",
             f"Machine: {platform.machine()}, {platform.system()} {platform.release()}",
             f"Logical cores: {os.cpu_count()} (usable by this process: {usable_cores()})"]
    for blas in blas_info():
        lines.append(f"BLAS: {blas['name']} {blas['version']}, threads: {blas['threads']} "
                     f"(via {blas['source']})")
    lines += [f"numpy version: {np.__version__}",
              f"Python version: {platform.python_version()} ({sys.implementation.name})",
              f"Moka threads: {parallel.num_threads()} (batch-parallel numpy steps; set "
              "MOKA_NUM_THREADS to change)"]
    return lines
