"""The training objective, term by term, against hand computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from cvvae import ConfigError
from cvvae.train.discriminator import adaptive_weight, hinge_d_loss
from cvvae.model.mapping import psi
from cvvae.train.losses import CVVAELoss, LossConfig

from .conftest import tiny_model, video


def ramp(B=2, k=2, C=1, H=2, W=2):
    """A video whose frame i is filled with the value i."""
    T = 1 + 4 * k
    return torch.arange(T, dtype=torch.float32).view(1, 1, T, 1, 1).expand(B, C, T, H, W).clone()


def test_psi_first_average_slice():
    x = ramp()
    assert psi(x, "first")[0, 0, :, 0, 0].tolist() == [0.0]
    assert psi(x, "average")[0, 0, :, 0, 0].tolist() == [0.0, 2.5, 6.5]  # means of 1..4 and 5..8
    assert psi(x, "slice")[0, 0, :, 0, 0].tolist() == [0.0, 4.0, 8.0]
    image = video(2, 3, 1, 4, 4)
    for m in ("first", "average", "slice", "random"):
        assert torch.equal(psi(image, m), image)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        psi(video(1, 3, 6, 4, 4), "slice")


def test_psi_random_is_per_sample_and_in_its_group():
    x = ramp(B=64, k=3)
    out = psi(x, "random", generator=torch.Generator().manual_seed(0))[:, 0, :, 0, 0]  # (B, 4)
    assert torch.all(out[:, 0] == 0)
    for j in range(3):
        assert torch.all((out[:, j + 1] >= 4 * j + 1) & (out[:, j + 1] <= 4 * j + 4))
        assert len(set(out[:, j + 1].tolist())) == 4  # every frame of the group gets drawn
    assert len({tuple(r) for r in out.tolist()}) > 1  # samples differ (the official shares one draw per batch)
    assert torch.equal(x, ramp(B=64, k=3))  # input untouched


def test_psi_random_frame_weights():
    x, g = ramp(B=400, k=2), torch.Generator().manual_seed(0)
    assert torch.equal(psi(x, "random", generator=g, frame_weights=(0, 0, 0, 1)), psi(x, "slice"))
    assert psi(x, "random", generator=g, frame_weights=(1, 0, 0, 0))[0, 0, :, 0, 0].tolist() == [0.0, 1.0, 5.0]
    out = psi(x, "random", generator=g, frame_weights=(1, 1, 1, 3))[:, 0, 1:, 0, 0]  # (B, 2)
    share = (out == torch.tensor([4.0, 8.0])).double().mean().item()  # last frame: odds 3 of 6
    assert 0.45 < share < 0.55 and len(set(out[:, 0].tolist())) == 4
    for bad in ((1, 1, 1), (1, 1, -1, 1), (0, 0, 0, 0)):
        with pytest.raises(ConfigError, match="random_frame_weights"):
            CVVAELoss(LossConfig(perceptual_weight=0, dec_reg_weight=0, random_frame_weights=bad))


def test_hinge_and_adaptive_weight():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    nll, g = (3 * w).sum(), (4 * w).sum()  # gradients (3, 3) and (4, 4)
    expected = 0.5 * math.sqrt(18) / (math.sqrt(32) + 1e-4)
    assert adaptive_weight(nll, g, w).item() == pytest.approx(expected)


def test_nll_by_hand():
    loss = CVVAELoss(LossConfig(perceptual_weight=0, dec_reg_weight=0, logvar_init=0.5))
    x, y = video(2, 3, 5, 4, 4), video(2, 3, 5, 4, 4, seed=1)
    expected = ((x - y).abs() / math.exp(0.5) + 0.5).sum() / (2 * 5)
    assert loss.nll(x, y, loss.logvar, 0.0).item() == pytest.approx(expected.item(), rel=1e-6)
    l2 = CVVAELoss(LossConfig(perceptual_weight=0, dec_reg_weight=0, logvar_init=0.5, pixel_loss="l2"))
    expected = ((x - y).square() / math.exp(0.5) + 0.5).sum() / (2 * 5)
    assert l2.nll(x, y, l2.logvar, 0.0).item() == pytest.approx(expected.item(), rel=1e-6)


def test_perceptual_term_is_per_frame_and_broadcast():
    class Mean(torch.nn.Module):  # a stand-in "LPIPS": per-frame mean absolute difference
        def forward(self, a, b):
            return (a - b).abs().flatten(1).mean(1)

    loss = CVVAELoss(LossConfig(perceptual_weight=0.5, dec_reg_weight=0), lpips=Mean())
    x, y = video(1, 3, 5, 4, 4), video(1, 3, 5, 4, 4, seed=1)
    per_frame = (x - y).abs().mean(dim=(1, 3, 4))  # (1, T)
    expected = ((x - y).abs().sum() + 0.5 * per_frame.sum() * 3 * 4 * 4) / 5
    assert loss.nll(x, y, loss.logvar, 0.5).item() == pytest.approx(expected.item(), rel=1e-5)


def upsample_decoder(z):  # a frozen "2D decoder": nearest upsampling of 3 latent channels
    return F.interpolate(z[:, :3], scale_factor=8)


def test_generator_loss_adds_up():
    torch.manual_seed(0)
    model = tiny_model().train()
    cfg = LossConfig(perceptual_weight=0, kl_weight=0.1, dec_reg_weight=2.0, mapping="slice")
    loss = CVVAELoss(cfg, image_decoder=upsample_decoder)
    x = video(1, 3, 9, 16, 16)
    total, parts, xrec = loss.generator_loss(model, x, step=0, generator=torch.Generator().manual_seed(0))
    assert xrec.shape == x.shape
    assert total.item() == pytest.approx((parts["nll"] + 0.1 * parts["kl"] + 2.0 * parts["reg_dec"]).item(), rel=1e-6)
    z = model.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(0))
    target = x[:, :, ::4]
    x2d = upsample_decoder(z[0].transpose(0, 1)).transpose(0, 1)[None]
    assert parts["reg_dec"].item() == pytest.approx(((target - x2d).abs().sum() / 3).item(), rel=1e-5)
    total.backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert loss.logvar.grad is not None and loss.logvar_2d.grad is not None


def test_frozen_encoder_skips_the_decoder_regulariser_in_training_steps_only():
    model = tiny_model().train()
    model.encoder.requires_grad_(False)
    cfg = LossConfig(perceptual_weight=0, dec_reg_weight=1.0, mapping="slice")
    x = video(1, 3, 5, 16, 16)
    frozen = CVVAELoss(cfg, image_decoder=upsample_decoder, encoder_frozen=True)
    total, parts, _ = frozen.generator_loss(model, x, step=0, generator=torch.Generator().manual_seed(0))
    assert "reg_dec" not in parts and total.item() == pytest.approx((parts["nll"] + parts["kl"]).item(), rel=1e-6)
    with torch.no_grad():  # an evaluation still reports it, the same as an unfrozen run's
        _, parts, _ = frozen.generator_loss(model, x, step=0, generator=torch.Generator().manual_seed(0))
        _, plain, _ = CVVAELoss(cfg, image_decoder=upsample_decoder).generator_loss(
            model, x, step=0, generator=torch.Generator().manual_seed(0))
    assert parts["reg_dec"].item() == pytest.approx(plain["reg_dec"].item(), rel=1e-6)


def test_encoder_regularisation_and_gan_terms():
    model = tiny_model().train()
    disc = torch.nn.Sequential(torch.nn.Conv3d(3, 1, 3, padding=1))

    def encoder_2d(frames):  # a frozen "2D encoder": 8x average pooling, 4 mean channels, logvar -4
        mean = F.avg_pool2d(frames, 8)
        mean = torch.cat([mean, mean[:, :1]], dim=1)
        return torch.cat([mean, torch.full_like(mean, -4.0)], dim=1)

    cfg = LossConfig(perceptual_weight=0, dec_reg_weight=0, enc_reg_weight=1.0, disc_start=5)
    loss = CVVAELoss(cfg, discriminator=disc, image_encoder=encoder_2d)
    x = video(2, 3, 5, 16, 16)
    last = model.decoder.conv_out.weight
    _, before, _ = loss.generator_loss(model, x, step=4, last_layer=last)
    assert "g" not in before and "reg_enc" in before
    total, after, xrec = loss.generator_loss(model, x, step=5, last_layer=last)
    assert "g" in after and after["d_weight"] > 0
    d_loss, d_parts = loss.discriminator_loss(x, xrec, step=5)
    assert d_loss.item() == pytest.approx(hinge_d_loss(disc(x), disc(xrec.detach())).item(), rel=1e-6)
    assert loss.discriminator_loss(x, xrec, step=0)[0].item() == 0.0


def test_missing_components_are_config_errors():
    with pytest.raises(ConfigError, match="LPIPS"):
        CVVAELoss(LossConfig(perceptual_weight=0.5))
    with pytest.raises(ConfigError, match="2D image decoder"):
        CVVAELoss(LossConfig(perceptual_weight=0))
    with pytest.raises(ConfigError, match="mapping"):
        CVVAELoss(LossConfig(perceptual_weight=0, dec_reg_weight=0, mapping="median"))
    with pytest.raises(ConfigError, match="pixel_loss"):
        CVVAELoss(LossConfig(perceptual_weight=0, dec_reg_weight=0, pixel_loss="huber"))
