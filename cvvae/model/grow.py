"""Grow a trained CV-VAE deeper without changing what it computes.

`deepen(model, n)` returns a copy with `n` ResnetBlocks per encoder level (n + 1 per decoder level). The old
blocks keep their weights and places; each new block goes at the end of its level's list (after the old blocks,
before the down/upsampler), has as many input as output channels (so no 1x1 shortcut), and starts with a zero
`conv2` (weight and bias). Its residual branch is then exactly zero and the block is the identity, so the grown
model reproduces the original bit for bit until training moves the new weights. This is how a small model gains
capacity without restarting: the zero conv2 gets gradients from the first step, conv1 as soon as conv2 is nonzero.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .autoencoder import CVVAE


def deepen(model: CVVAE, num_res_blocks: int) -> CVVAE:
    """A copy of `model` with `num_res_blocks` blocks per level, the new ones starting as the identity."""
    old = model.config.num_res_blocks
    if num_res_blocks < old:
        raise ConfigError(f"deepen can only add ResBlocks: the model has {old} per level, asked for {num_res_blocks}")
    if model.config.attn_resolutions:
        raise ConfigError("deepen needs attn_resolutions = []: a new block would also need an identity attention")
    grown = CVVAE.from_config({**model.config, "num_res_blocks": num_res_blocks})
    if grown.dtype != model.dtype:
        grown = grown.to(model.dtype)
    missing, unexpected = grown.load_state_dict(model.state_dict(), strict=False)
    if unexpected:
        raise ConfigError(f"deepen: unexpected parameters {unexpected[:3]}")
    new_blocks = [level.block[j] for coder, first_new in ((grown.encoder.down, old), (grown.decoder.up, old + 1))
                  for level in coder for j in range(first_new, len(level.block))]
    for block in new_blocks:
        _zero(block.conv2)
    prefixes = {name for name, m in grown.named_modules() if any(m is b for b in new_blocks)}
    stray = [k for k in missing if not any(k.startswith(p + ".") for p in prefixes)]
    if stray:  # e.g. a layout change in the model that this function does not know about
        raise ConfigError(f"deepen: parameters neither copied nor new: {stray[:3]}")
    return grown.train(model.training)


def _zero(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
