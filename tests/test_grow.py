"""Growing a CV-VAE deeper (cvvae.model.grow.deepen): exact identity at the start, then trainable."""

import re

import pytest
import torch

from cvvae.errors import ConfigError
from cvvae.model.grow import deepen

from .conftest import TINY_SD3, tiny_model, video


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
