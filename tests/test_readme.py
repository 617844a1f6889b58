"""The README's Python example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README.md has no python example"
    monkeypatch.chdir(tmp_path)  # it saves model.pt
    from realnvp import RealNVPConfig
    from realnvp.train import TrainConfig, Trainer

    # the example evaluates `realnvp demo`'s run folder: a two-step stand-in for it here
    Trainer(RealNVPConfig(input_shape=(1, 28, 28), scales=2, res_blocks=1, features=4),
            TrainConfig(run_dir="runs/demo", steps=2, batch_size=16, eval_images=16,
                        sample_every=1000, progress=False)).run()
    namespace: dict = {}
    with torch.no_grad():
        exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["bpd"].shape == (8,) and torch.isfinite(namespace["bpd"]).all()
    assert namespace["big"].shape == (4, 3, 64, 64)
    assert (tmp_path / "model.pt").is_file()
    assert not namespace["demo"].training
