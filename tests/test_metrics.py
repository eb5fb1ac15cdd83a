"""Metric definitions against known values and scikit-image."""

import math

import numpy as np
import pytest
import torch

from cvvae.eval.metrics import PSNR_CAP, psnr, ssim


def test_psnr_known_values():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.8
    assert torch.all(psnr(x, x) == PSNR_CAP)
    shifted = x + 0.1  # uniform shift: MSE = 0.01 exactly -> 20 dB
    torch.testing.assert_close(psnr(x, shifted), torch.full((2,), 20.0))
    assert psnr(x, x + 1 / 255).sub(20 * math.log10(255)).abs().max() < 1e-3


def test_ssim_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 40, 48, generator=g)
    y = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    ref = metrics.structural_similarity(x[0].permute(1, 2, 0).numpy(), y[0].permute(1, 2, 0).numpy(),
                                        channel_axis=2, gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False, data_range=1.0)
    assert abs(ssim(x, y).item() - ref) < 1e-5
    assert ssim(x, x).item() == pytest.approx(1.0)
    assert np.isfinite(ssim(torch.zeros(1, 3, 11, 11), torch.zeros(1, 3, 11, 11)).item())


@pytest.mark.parametrize("case", ["photo, blurred", "photo, one level of noise", "smooth gradient, noisy"])
def test_ssim_matches_scikit_image_on_real_and_near_identical_frames(case):
    # the local means run in float32 (metrics.ssim): hold it to scikit-image's float64 where it matters most,
    # on frames almost equal to their reference and on smooth ones (small variances)
    data, metrics = pytest.importorskip("skimage.data"), pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(1)
    if case.startswith("photo"):
        x = torch.from_numpy(data.astronaut()[100:228, 150:310]).permute(2, 0, 1)[None].double() / 255
    else:
        rows = torch.linspace(0.3, 0.9, 128, dtype=torch.float64)
        cols = torch.linspace(0.2, 0.8, 160, dtype=torch.float64)
        x = (rows[:, None] * cols[None, :]).expand(1, 3, 128, 160).clone()
    if case == "photo, blurred":
        y = torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    else:
        y = x + torch.randint(-1, 2, x.shape, generator=g) / 255
    y = (y.clamp(0, 1) * 255).round() / 255
    ref = metrics.structural_similarity(x[0].permute(1, 2, 0).numpy(), y[0].permute(1, 2, 0).numpy(),
                                        channel_axis=2, gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False, data_range=1.0)
    assert abs(ssim(x, y).item() - ref) < 1e-6, (ssim(x, y).item(), ref)


@pytest.mark.parametrize("chunk_values", [1, 2 * 3 * 40 * 48, 1 << 22])
def test_ssim_of_many_frames_scores_each_frame_whatever_the_chunking(monkeypatch, chunk_values):
    # frames are scored a few at a time (bounded memory): every frame's value is still scikit-image's
    import cvvae.eval.metrics as metrics_module

    metrics = pytest.importorskip("skimage.metrics")
    monkeypatch.setattr(metrics_module, "SSIM_CHUNK_VALUES", chunk_values)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(5, 3, 40, 48, generator=g)
    y = (x + 0.05 * torch.arange(1, 6).view(5, 1, 1, 1) * torch.randn(x.shape, generator=g)).clamp(0, 1)
    refs = [metrics.structural_similarity(a.permute(1, 2, 0).numpy(), b.permute(1, 2, 0).numpy(), channel_axis=2,
                                          gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                          data_range=1.0) for a, b in zip(x, y)]
    values = ssim(x, y)
    assert values.shape == (5,)
    np.testing.assert_allclose(values.numpy(), refs, atol=1e-5)
