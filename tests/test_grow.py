"""Growing a CV-VAE deeper (cvvae.model.grow.deepen) or wider (widen): the same function at the start, then
trainable."""

import re

import pytest
import torch

from cvvae.errors import ConfigError
from cvvae.model.grow import deepen, widen

from .conftest import TINY_SD3, rel_err, tiny_model, video


@pytest.mark.parametrize("cfg", [{}, TINY_SD3], ids=["sd21", "sd3"])
def test_new_blocks_start_as_the_identity(cfg):
    model = tiny_model(1, **cfg)
    grown = deepen(model, 3)
    old, new = model.state_dict(), grown.state_dict()
    assert grown.config.num_res_blocks == 3 and all(torch.equal(v, new[k]) for k, v in old.items())
    added = sorted({re.match(r"(.*\.block\.\d+)\.", k)[1] for k in set(new) - set(old)})  # encoder.down.0.block.1
    # 4 levels: blocks 1, 2 of each encoder level, 2, 3 of each decoder level (which has n + 1)
    assert added == sorted(f"{p}.{i}.block.{j}" for i in range(4) for p, js in
                           (("encoder.down", (1, 2)), ("decoder.up", (2, 3))) for j in js)
    x = video(1, 3, 9, 32, 32)
    with torch.no_grad():
        assert torch.equal(grown(x).sample, model(x).sample)
        assert torch.equal(grown.encode(x).latent_dist.mean, model.encode(x).latent_dist.mean)


def test_grown_blocks_learn():
    grown = deepen(tiny_model(2), 2).train()
    grown(video(1, 3, 5, 16, 16)).sample.square().mean().backward()
    block = grown.decoder.up[0].block[2]
    assert block.conv2.weight.grad.abs().sum() > 0  # zero conv2 gets a gradient at once
    assert block.conv1.weight.grad.abs().sum() == 0  # conv1's output only reaches the loss through conv2


def test_deepen_refuses_to_shrink_or_to_skip_attention():
    with pytest.raises(ConfigError, match="only add"):
        deepen(tiny_model(), 0)
    with pytest.raises(ConfigError, match="attn_resolutions"):
        deepen(tiny_model(attn_resolutions=[4]), 2)


@pytest.mark.parametrize("cfg, factor", [
    ({}, 2), (TINY_SD3, 2),
    (dict(decoder_attn_type="spatial-temporal-residual", use_post_quant_conv=True, half_3d=False), 3),
], ids=["sd21", "sd3", "residual-attention-post-quant-full-3d-x3"])
def test_widened_model_computes_the_same(cfg, factor):
    model = tiny_model(1, **cfg)
    wide = widen(model, factor)
    assert wide.config.block_out_channels == [8 * factor, 16 * factor, 16 * factor, 16 * factor]
    assert wide.encoder.down[1].block[0].conv1.weight.shape == (16 * factor, 8 * factor, 3, 3, 3)
    x = video(1, 3, 9, 32, 32)  # 9 frames: both temporal upsamplers, whose conv emits two frames' channels
    with torch.no_grad():  # float rounding of the split weights only; a wrong channel map gives O(1)
        assert rel_err(wide(x).sample, model(x).sample) < 1e-5
        assert rel_err(wide.encode(x).latent_dist.mean, model.encode(x).latent_dist.mean) < 1e-5


def test_widened_copies_part_after_one_step():
    wide = widen(tiny_model(1), 2).train()
    conv1 = wide.encoder.down[0].block[0].conv1  # 16 channels in 4 groups: channels 0, 1 of group 0 and copies 2, 3
    seen = []
    conv1.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    x = video(1, 3, 5, 16, 16)
    optimizer = torch.optim.Adam(wide.parameters(), lr=1e-3)
    wide(x).sample.square().mean().backward()
    optimizer.step()
    with torch.no_grad():
        wide(x)
    before, after = (rel_err(h[:, 2:4], h[:, 0:2]) for h in seen)
    assert before < 1e-6 and after > 1e-3  # random shares: equal ones keep the copies equal


def test_widen_by_one_is_a_copy():
    model = tiny_model(1)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in widen(model, 1).state_dict().items())


def test_widen_refuses_a_factor_below_one():
    with pytest.raises(ConfigError, match="at least 1"):
        widen(tiny_model(), 0)
