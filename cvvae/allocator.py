"""CPU memory allocator tuning: keep freed blocks for reuse instead of returning them to the OS.

glibc's malloc serves every block over 32 MiB with its own `mmap` and unmaps it on `free`. A video VAE
allocates such blocks many times per step (one 9x256x256 activation at 32 channels is 75 MB), so each
step pays the kernel to map and zero those pages again: at 256 px, training spends nearly half its time
in the kernel (docs/benchmarks.md, `benchmarks/bench_allocator.py`). Telling malloc to take all memory
from its heap and not to trim it makes freed blocks reusable, the way PyTorch's CUDA caching allocator
does on GPUs. The cost is memory (docs/benchmarks.md): freed blocks stay in the heap, where later requests
of other sizes cannot always reuse them. Where every step has the same shapes, as in training, peak memory
rises by about a quarter; where they vary, as over the rounds and tiles of a long video, the heap keeps
growing (13.7 GiB instead of 2.7 GiB for 132 frames). So `cvvae train` applies it and the inference commands do
not; library users can call `keep_freed_memory()` in their own training scripts.

No Python package does this for PyTorch on CPU (jemalloc or tcmalloc would need LD_PRELOAD and a system
package), so it is three `mallopt` calls through ctypes.
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt parameter numbers from glibc's malloc.h
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
# Environment variables through which a user already tuned malloc; we leave those choices alone.
_MALLOC_VARS = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
OPT_OUT_VAR = "CVVAE_ALLOCATOR"  # set to "system" to keep the C library's defaults


def untuned_environ() -> dict[str, str]:
    """os.environ without the variables `keep_freed_memory` defers to: a child process started with it has
    glibc's default malloc settings, and `keep_freed_memory` takes effect there (benchmarks, tests)."""
    return {k: v for k, v in os.environ.items()
            if k not in (*_MALLOC_VARS, OPT_OUT_VAR) and not (k == "GLIBC_TUNABLES" and "glibc.malloc." in v)}


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in its heap (no per-block mmap, no trimming); True if applied.

    A no-op (False) off glibc, when the user tunes malloc through its environment variables, or when
    the environment variable CVVAE_ALLOCATOR is "system". Applies to allocations made after the call.
    """
    if os.environ.get(OPT_OUT_VAR, "").lower() == "system":
        return False
    if any(v in os.environ for v in _MALLOC_VARS) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_MAX, 0),                # every block from the heap, where freed ones are reused
        (_M_TRIM_THRESHOLD, 2**31 - 1),  # hand the heap's free top back only above 2 GiB (mallopt's int limit)
        (_M_TOP_PAD, 256 * 2**20),       # grow the heap in 256 MiB steps: fewer brk calls
    ))
