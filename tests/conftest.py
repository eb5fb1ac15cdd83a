"""Shared helpers: tiny configs, randomised norms/biases, the official golden fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cvvae import CVVAE

torch.set_num_threads(2)

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"

# Four levels (8x space, 4x time) at tiny widths: the released topology in miniature.
TINY = dict(ch=8, ch_mult=[1, 2, 2, 2], num_res_blocks=1, norm_num_groups=4)
TINY_SD3 = dict(TINY, z_channels=16, norm_eps=1e-6, padding_mode="replicate",
                encoder_attn_type="vanilla", decoder_attn_type="vanilla")


def randomise_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Norm weights 1 + 0.1 N(0,1), biases 0.1 N(0,1), so that a mis-mapped norm or bias shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                base = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
    return model


def tiny_model(seed: int = 0, **overrides) -> CVVAE:
    torch.manual_seed(seed)
    return randomise_(CVVAE(**{**TINY, **overrides}), seed).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def video(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip("../shared/fixtures (golden outputs of the official code) is not present")
    return FIXTURES
