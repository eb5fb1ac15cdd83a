"""FVD: the Frechet distance between I3D features of real and reconstructed clips.

FVD uses a user-supplied I3D TorchScript file (StyleGAN-V's `i3d_torchscript.pt`, a port of the tf.hub
Kinetics-400 I3D used by the original FVD); it is never downloaded. Calling convention, as in
universome/fvd-comparison `compare_metrics.py`: `detector(x, rescale=False, resize=False, return_features=True)`
with x float32 (N, 3, T, 224, 224) in [-1, 1] -> (N, 400) logits before the softmax. We resize each uint8-rounded
frame to 224 x 224 ourselves (bilinear, no antialiasing) and map [0, 255] -> [-1, 1] as the original TF
`preprocess` does.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CheckpointError, InputError

I3D_SIZE = 224


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray, method: str) -> float:
    """tr((s1 s2)^(1/2)) of two covariance matrices."""
    if method == "auto":
        try:
            import scipy.linalg  # noqa: F401

            method = "scipy"
        except ImportError:
            method = "eigh"
    if method == "scipy":
        import scipy.linalg

        def sqrtm(a: np.ndarray) -> np.ndarray:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # `disp` is deprecated from SciPy 1.16; singular-matrix notes
                try:
                    out = scipy.linalg.sqrtm(a, disp=False)
                except TypeError:  # SciPy >= 1.18 has no `disp`
                    out = scipy.linalg.sqrtm(a)
            return out[0] if isinstance(out, tuple) else out

        covmean = sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():  # singular product: offset the diagonals (as pytorch-fid does)
            offset = np.eye(s1.shape[0]) * 1e-6
            covmean = sqrtm((s1 + offset) @ (s2 + offset))
        return float(np.real(np.trace(covmean)))
    if method == "eigh":
        a, b = torch.as_tensor(s1, dtype=torch.float64), torch.as_tensor(s2, dtype=torch.float64)
        w, v = torch.linalg.eigh((a + a.T) / 2)
        root = v @ torch.diag(w.clamp_min(0).sqrt()) @ v.T
        m = root @ b @ root  # similar to s1 s2 for PSD s1, s2, and symmetric: its eigenvalues are real
        return float(torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum())
    raise ValueError(f"method must be 'auto', 'scipy' or 'eigh', got {method!r}")


def frechet_distance_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                                method: str = "auto") -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), the Frechet (W2^2) distance of two
    Gaussians. `method`: "scipy" (scipy.linalg.sqrtm), "eigh" (torch, symmetric eigendecompositions) or
    "auto" (scipy when installed)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * _trace_sqrt_product(s1, s2, method))


def frechet_distance(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, method: str = "auto") -> float:
    """Frechet distance between feature sets a (N, D) and b (M, D) (N, M >= 2; covariances with N - 1)."""
    a, b = (np.asarray(torch.as_tensor(t).double().cpu()) for t in (a, b))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise InputError(f"need two feature sets (N >= 2, D) of equal D, got {a.shape} and {b.shape}")
    return frechet_distance_from_stats(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False), method)


def load_i3d(path: str | os.PathLike, device: torch.device | str = "cpu") -> torch.jit.ScriptModule:
    """The user's I3D TorchScript file (e.g. StyleGAN-V's i3d_torchscript.pt); never downloaded."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"I3D TorchScript file not found: {path} (FVD needs a local i3d_torchscript.pt)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch >= 2.10 deprecates TorchScript
            return torch.jit.load(str(path), map_location="cpu").eval().to(device)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's checkpoint problem
        raise CheckpointError(f"cannot load the I3D TorchScript file {path}: {type(e).__name__}: {e}"
                              .splitlines()[0]) from None


@torch.no_grad()
def i3d_features(detector: torch.nn.Module, frames01: torch.Tensor) -> torch.Tensor:
    """I3D features (1, D) of one clip given as frames (T, 3, H, W) in [0, 1] (see the module docstring)."""
    x = F.interpolate(frames01.float() * 255, size=(I3D_SIZE, I3D_SIZE), mode="bilinear", align_corners=False)
    x = (2 * x / 255 - 1).clamp(-1, 1).permute(1, 0, 2, 3).unsqueeze(0)  # (1, 3, T, 224, 224)
    device = next(iter(detector.parameters()), torch.empty(0)).device
    try:
        out = detector(x.to(device), rescale=False, resize=False, return_features=True)
    except Exception as e:  # noqa: BLE001 - a foreign TorchScript file fails in its own ways
        raise CheckpointError(f"the I3D detector failed on a clip {tuple(x.shape)}: {type(e).__name__}: {e}"
                              .splitlines()[0]) from None
    return out.detach().float().cpu().reshape(1, -1)

