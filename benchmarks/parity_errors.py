"""Relative L2 error of every output of the official code's golden files against this code (float32).

    python benchmarks/parity_errors.py [../shared/fixtures]

The figures behind `tests/test_golden.py`'s bound (FP32_ROUNDING): for each variant (sd21, sd3), the raw encoder
and decoder of one clip, and the mean, logvar and decoded clip of the released temporal rounds and of the spatial
tiling along W and along H. Run it on another commit (copy the script there) to see what a change did to them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

from cvvae import CVVAE


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("fixtures", type=Path, nargs="?", default=Path(__file__).parents[2] / "shared" / "fixtures")
    args = parser.parse_args()
    if not (args.fixtures / "sd21_golden.safetensors").is_file():
        raise SystemExit(f"error: no golden files in {args.fixtures}")
    print("| variant | output | relative L2 error |\n|---|---|---|")
    with torch.no_grad():
        for variant in ("sd21", "sd3"):
            model = CVVAE.from_pretrained(args.fixtures / variant).eval()
            g = load_file(str(args.fixtures / f"{variant}_golden.safetensors"))
            errors = {"encoder": rel_err(model.encoder(g["single_x"]), g["single_moments"]),
                      "decoder": rel_err(model.decoder(g["single_z"]), g["single_y"])}
            for kind in ("chunked", "tiledw", "tiledh"):
                posterior = model.encode(g[f"{kind}_x"]).latent_dist
                errors[f"{kind} mean"] = rel_err(posterior.mean, g[f"{kind}_mean"])
                errors[f"{kind} logvar"] = rel_err(posterior.logvar, g[f"{kind}_logvar"])
                errors[f"{kind} decoded"] = rel_err(model.decode(g[f"{kind}_z"]).sample, g[f"{kind}_y"])
            for name, error in errors.items():
                print(f"| {variant} | {name} | {error:.1e} |")


if __name__ == "__main__":
    main()
