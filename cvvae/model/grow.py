"""Grow a trained CV-VAE deeper or wider without changing what it computes.

`deepen(model, n)` returns a copy with `n` ResnetBlocks per encoder level (n + 1 per decoder level). The old
blocks keep their weights and places; each new block goes at the end of its level's list (after the old blocks,
before the down/upsampler), has as many input as output channels (so no 1x1 shortcut), and starts with a zero
`conv2` (weight and bias). Its residual branch is then exactly zero and the block is the identity, so the grown
model reproduces the original bit for bit until training moves the new weights. This is how a small model gains
capacity without restarting: the zero conv2 gets gradients from the first step, conv1 as soon as conv2 is nonzero.

`widen(model, factor)` returns a copy with `factor` times the channels at every level (Net2WiderNet, Chen et al.
2016, adapted to GroupNorm and attention). Every channel of every inner activation appears `factor` times; the
copies of a channel sit in the group of the original, so each GroupNorm group holds the same values `factor` times
over and keeps its mean and variance (LayerNorm over channels likewise). A layer reading a widened activation
splits each weight over the copies of its input channel with random shares that sum to one, so it computes the
same sum; the random shares give the copies different gradients from the first step (equal shares would keep
every copy identical to its original forever: a wider model in name only).
Attention queries are scaled by 1/sqrt(factor), since the dot product now counts each channel `factor` times and
the softmax scale 1/sqrt(C) only shrinks by sqrt(factor). The image and latent channels stay as they are. In
float32 the widened model reproduces the original up to float rounding (about 1e-6 relative).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .autoencoder import CVVAE
from .layers import Upsample


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


def widen(model: CVVAE, factor: int, seed: int = 0) -> CVVAE:
    """A copy of `model` (on the CPU) with `factor` times the channels at every level, computing the same function;
    `seed` draws the shares of the split weights."""
    if factor < 1:
        raise ConfigError(f"widen needs a factor of at least 1, got {factor}")
    cfg = model.config
    widths = [c * factor for c in cfg.block_out_channels]
    wide = CVVAE.from_config({**cfg, "block_out_channels": widths, "ch": cfg.ch * factor})
    groups = cfg.norm_num_groups
    twofold = {f"{name}.conv." for name, m in model.named_modules() if isinstance(m, Upsample) and m.time}
    queries = (".q.weight", ".q.bias", ".q_t.weight", ".q_t.bias")
    g = torch.Generator().manual_seed(seed)
    old = model.state_dict()
    new = {}
    for name, target in wide.state_dict().items():
        src = old[name].detach().cpu().double()
        # A dimension is widened where the widened model's is larger (output: dim 0, input: dim 1), else it stays
        # (image and latent channels). A layer packing several activations into one dimension needs its own map,
        # like a temporal upsampler's conv, whose channels are two frames', [frame 2t-1 | frame 2t]: each half maps
        # on its own. A layout this function does not know would pass the shape check below and compute another
        # function: tests/test_grow.py compares outputs for every variant.
        halves = 2 if any(name.startswith(p) for p in twofold) else 1
        if target.shape[0] != src.shape[0]:
            src = src[_copies(src.shape[0], factor, groups, halves)]
        if target.ndim > 1 and target.shape[1] != src.shape[1]:
            index = _copies(src.shape[1], factor, groups)
            shares = torch.rand(target.shape, generator=g, dtype=src.dtype) + 0.5
            total = torch.zeros(src.shape, dtype=src.dtype).index_add_(1, index, shares)
            src = src[:, index] * shares / total[:, index]
        if name.endswith(queries):
            src = src / factor**0.5
        if src.shape != target.shape:
            raise ConfigError(f"widen: {name} is {tuple(old[name].shape)}, widened {tuple(target.shape)}")
        new[name] = src.to(old[name].dtype)
    wide.load_state_dict(new)
    if wide.dtype != model.dtype:
        wide = wide.to(model.dtype)
    return wide.train(model.training)


def _copies(channels: int, factor: int, groups: int, halves: int = 1) -> torch.Tensor:
    """For each channel of the widened activation, the original channel it copies: the `factor` copies of a
    GroupNorm group follow one another, so new group k holds old group k's channels `factor` times."""
    per_half = channels // halves
    if per_half % groups:  # every width is a multiple of the groups (CVVAE's config check); a new layer's may not be
        raise ConfigError(f"widen: {per_half} channels do not fall into {groups} GroupNorm groups")
    size = per_half // groups
    j = torch.arange(per_half * factor)
    index = (j // (size * factor)) * size + j % size
    return torch.cat([index + h * per_half for h in range(halves)])
