"""The simplest density model of the demo's digits, for scale: every pixel independent, each a
categorical distribution over 0..255 fitted by counting on the 9,000 training images (with
``--smoothing`` pseudo-counts per value), scored in bits/dim on the 1,000 held out.

    python scripts/pixel_baseline.py [--smoothing 0.5]

A discrete model's bits/dim is −log₂ P(x)/D, directly comparable with the flow's (an upper
bound on its discrete code length, SPEC section 2).
"""

from __future__ import annotations

import argparse

import torch

from realnvp.data import DEMO_DATA, load_dataset


def independent_pixel_bits(train: torch.Tensor, test: torch.Tensor, smoothing: float
                           ) -> torch.Tensor:
    """Bits/dim of each ``test`` image (uint8, (M, ...)) under per-pixel categoricals counted on
    ``train`` (uint8, (N, ...)): P(pixel d = v) = (n_dv + s) / (N + 256 s)."""
    x_train, x_test = train.flatten(1).long(), test.flatten(1).long()  # (N, D), (M, D)
    dims = x_train.shape[1]
    counts = torch.full((dims, 256), smoothing, dtype=torch.float64)
    counts.scatter_add_(1, x_train.T, torch.ones(x_train.T.shape, dtype=torch.float64))
    log2_p = torch.log2(counts / counts.sum(1, keepdim=True))  # (D, 256)
    return -log2_p.gather(1, x_test.T).sum(0) / dims


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoothing", type=float, default=0.5,
                        help="pseudo-count added to every value of every pixel (0.5: Jeffreys)")
    args = parser.parse_args()
    train = load_dataset("mnist-t10k", DEMO_DATA, "train")
    test = load_dataset("mnist-t10k", DEMO_DATA, "test")
    bits = independent_pixel_bits(train.get_batch(torch.arange(len(train)))[0],
                                  test.get_batch(torch.arange(len(test)))[0], args.smoothing)
    print(f"independent pixels, smoothing {args.smoothing}: {bits.mean():.4f} ± "
          f"{bits.std() / len(bits) ** 0.5:.4f} bits/dim ({len(bits)} held-out images)")


if __name__ == "__main__":
    main()
