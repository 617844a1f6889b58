"""The demo's model and recipe (``realnvp demo``) trained with each ``bn_entries`` choice and
several seeds, scored in fp32 bits/dim on the demo's 1,000 held-out MNIST images.

    python scripts/compare_bn_entries.py [--entries all transformed official] [--seeds 0 1 2]

Seed 0 with ``all`` is the demo itself. Each run takes 4–5 minutes on the project's 2-core
CPU; runs go to ``--run-root`` (default runs/bn-entries/ENTRIES-SEED) and, like every run,
resume if stopped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from realnvp import RealNVPConfig
from realnvp.cli import DEMO_MODEL, DEMO_TRAIN
from realnvp.data import DEMO_DATA, load_dataset
from realnvp.evaluate import evaluate
from realnvp.train import TrainConfig, Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", nargs="+", default=["all", "transformed", "official"],
                        choices=["all", "transformed", "official"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--run-root", type=Path, default=Path("runs/bn-entries"))
    args = parser.parse_args()
    test = load_dataset("mnist-t10k", DEMO_DATA, "test")
    for entries in args.entries:
        for seed in args.seeds:
            train = TrainConfig(**{**DEMO_TRAIN, "seed": seed, "progress": False,
                                   "run_dir": str(args.run_root / f"{entries}-{seed}")})
            trainer = Trainer(RealNVPConfig(**DEMO_MODEL, bn_entries=entries), train)
            trainer.run()
            print(f"bn_entries={entries} seed={seed}: {evaluate(trainer.model, test)}",
                  flush=True)


if __name__ == "__main__":
    main()
