"""Where and in what precision cvvae computes: the one resolver of devices and dtypes.

- :func:`resolve_device`: ``None`` -> CUDA when available, else the CPU; ``"cuda"`` without a GPU is refused.
- :func:`resolve_dtype`: ``"auto"`` -> bfloat16 where it is native (:func:`native_bf16`), else float32;
  float16 is refused on the CPU (no fast kernels there); bfloat16 on a CPU without native support warns.
- :func:`compute_dtype`: what a model whose weights have a given dtype actually computes in when a
  dtype is asked for: reduced-precision weights compute in their own dtype, so asking for another one
  is refused rather than ignored.
"""

from __future__ import annotations

import warnings

import torch

from .errors import InputError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """The device to run on: ``name``, or CUDA when available, else the CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {name!r}; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda asked for, but no CUDA GPU is available")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"device {name!r} is not supported; use cpu or cuda")
    return device


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """True where bfloat16 is fast: CUDA GPUs that support it, CPUs with AVX512-BF16 or AMX."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | str = "cpu") -> torch.dtype:
    """'auto' (or None): bfloat16 where it is native (see `native_bf16`), else float32.

    float16 is refused on CPU (about 3 GFLOP/s there); bfloat16 on a CPU without native support
    works but is 30-90x slower than float32, so it warns.
    """
    device = torch.device(device)
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise InputError(f"unknown dtype {dtype!r}; use auto, fp32, bf16 or fp16")
        dtype = DTYPES[dtype]
    if dtype not in DTYPE_NAMES:
        raise InputError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
    if device.type == "cpu" and dtype == torch.float16:
        raise InputError("fp16 is not supported on CPU (it is ~50x slower than fp32); use fp32 or bf16")
    if device.type == "cpu" and dtype == torch.bfloat16 and not native_bf16(device):
        warnings.warn("this CPU has no native bfloat16 (AVX512-BF16/AMX): bf16 will be far slower than fp32",
                      stacklevel=3)
    return dtype


def compute_dtype(asked: str | torch.dtype | None, weights: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The dtype a model with ``weights``-dtype parameters computes in when ``asked`` is requested.

    None: the weights' own dtype. float32 weights run any supported dtype (lower ones under autocast, "auto" as
    :func:`resolve_dtype`); reduced-precision weights run in their own dtype ("auto" picks it), and asking for
    another one raises :class:`InputError` (load the model in float32 to choose the precision per call).
    """
    name = DTYPE_NAMES.get(weights, str(weights))
    if asked is None or (asked == "auto" and weights != torch.float32):
        if weights == torch.float16 and torch.device(device).type == "cpu":
            raise InputError("the model's weights are fp16, which does not run on a CPU: load it with "
                             "torch_dtype=torch.float32 (or torch.bfloat16)")
        return resolve_dtype(weights, device)
    if weights == torch.float32:
        return resolve_dtype(asked, device)
    dtype = resolve_dtype(asked, device)
    if dtype != weights:
        raise InputError(f"the model's weights are {name}, so it computes in {name}, not {DTYPE_NAMES[dtype]}: "
                         "load it in float32 (torch_dtype=torch.float32) to compute in another precision")
    return dtype
