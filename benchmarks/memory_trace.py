"""Where the activation memory of an encode + decode goes, without computing anything.

    python benchmarks/memory_trace.py 17 128 128          # T H W of the clip; SD2.1-size model

Runs the encoder and the decoder of the full-size CV-VAE (no chunking, no tiles, no autograd) on the
meta device under a dispatch mode that counts the bytes of every tensor storage the forward creates
and frees, and prints each half's peak of live activation bytes (weights excluded) with the largest
tensors alive at that moment and the module that made them. Seconds, even for clips that would need
tens of GiB. Peak RSS of a real run adds the weights and the runtime (`bench_codec.py`'s floor).
"""

from __future__ import annotations

import argparse
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Live bytes of the storages created under this mode; a storage counts until its last tensor dies. Storages in
    `external` (weights) and under `min_bytes` are not counted; each counted one is labelled by `origin_of`."""

    def __init__(self, external: set[int] = frozenset(), min_bytes: int = 0) -> None:
        super().__init__()
        self.external, self.min_bytes, self.refs, self.sizes, self.origin = external, min_bytes, {}, {}, {}
        self.live = self.peak = 0
        self.at_peak: list[tuple[int, str]] = []
        self.where: list[str] = ["-"]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() >= self.min_bytes:
                self._track(t, func)
        return out

    def origin_of(self, func) -> str:
        """The module running now (`where`, kept by the caller's hooks)."""
        return self.where[-1]

    def _track(self, t: torch.Tensor, func) -> None:
        key = t.untyped_storage()._cdata
        if key in self.external:
            return
        if key not in self.refs:
            self.refs[key], self.sizes[key], self.origin[key] = 0, t.untyped_storage().nbytes(), self.origin_of(func)
            self.live += self.sizes[key]
            if self.live > self.peak:
                self.peak = self.live
                self.at_peak = sorted(((self.sizes[k], self.origin[k]) for k in self.refs), reverse=True)
        self.refs[key] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            self.live -= self.sizes.pop(key)
            del self.refs[key], self.origin[key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("T", type=int)
    parser.add_argument("H", type=int)
    parser.add_argument("W", type=int)
    parser.add_argument("--top", type=int, default=5, help="tensors listed at each peak")
    args = parser.parse_args()

    from cvvae import CVVAE

    with torch.device("meta"):
        model = CVVAE().eval()
    external = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    for name, module in model.named_modules():
        if name:
            module.register_forward_pre_hook(lambda m, i, name=name: mode.where.append(name))
            module.register_forward_hook(lambda m, i, o: mode.where.pop() and None)
    x = torch.empty(1, 3, args.T, args.H, args.W, device="meta")
    z_channels = model.config.z_channels
    with torch.no_grad():
        for half, run in (("encoder", lambda: model.encoder(x)), ("decoder", lambda: model.decoder(z))):
            mode = LiveBytes(external)
            with mode:
                out = run()
            if half == "encoder":
                z = out[:, :z_channels].clone()
            print(f"{half}: peak {mode.peak / 2**20:.0f} MiB of activations")
            for size, origin in mode.at_peak[: args.top]:
                print(f"  {size / 2**20:8.1f} MiB  made by {origin}")


if __name__ == "__main__":
    main()
