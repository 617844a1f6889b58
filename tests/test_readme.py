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
    namespace: dict = {}
    with torch.no_grad():
        exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["bpd"].shape == (8,) and torch.isfinite(namespace["bpd"]).all()
    assert namespace["big"].shape == (4, 3, 64, 64)
    assert (tmp_path / "model.pt").is_file()
