"""realnvp.allocator.keep_freed_memory: a training step reuses freed memory without page faults."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from realnvp import allocator, train

# Three training steps (forward and backward) of a small image model at batch 64, after two
# warm-up steps; prints the page faults of each. With glibc's default thresholds a step frees
# tens of MiB at the top of the heap, more than the trim threshold, which go back to the kernel
# and are faulted in again in the next step (for the cifar10 preset: about 200,000 a step).
PROBE = textwrap.dedent("""
    import resource, sys, torch
    from realnvp import RealNVP, RealNVPConfig, dequantize
    from realnvp.allocator import keep_freed_memory
    applied = keep_freed_memory() if sys.argv[1] == "keep" else None
    torch.manual_seed(0)
    model = RealNVP(RealNVPConfig(input_shape=(3, 32, 32), scales=2, res_blocks=1, features=32))
    x = dequantize(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8))
    def step():
        (-model.log_prob(x, check=False)).mean().backward()
    step()
    step()
    faults = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(applied, *faults)
""")


def page_faults(setting: str) -> tuple[str, list[int]]:
    """(what keep_freed_memory returned, page faults of each step) in a fresh process with
    nothing in its environment that changes malloc (LD_PRELOAD, GLIBC_TUNABLES)."""
    out = subprocess.run([sys.executable, "-c", PROBE, setting], capture_output=True, text=True,
                         check=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    applied, *faults = out.stdout.split()
    return applied, [int(f) for f in faults]


def test_training_steps_reuse_freed_memory_without_page_faults():
    applied, kept = page_faults("keep")
    _, default = page_faults("default")
    assert applied == "True"
    assert min(default) > 10_000, default  # the premise: glibc's defaults fault at every step
    assert sum(kept) < 0.05 * sum(default), (kept, default)  # measured: about 1 %


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert allocator.keep_freed_memory() is False


@pytest.mark.parametrize("keep", [True, False])
def test_trainer_follows_its_config(tmp_path, monkeypatch, keep):
    calls = []
    monkeypatch.setattr(train, "keep_freed_memory", lambda: calls.append(True) or True)
    config = train.TrainConfig(run_dir=str(tmp_path), steps=1, keep_freed_memory=keep,
                               progress=False)
    train.Trainer(train.RealNVPConfig(input_shape=(1, 28, 28), scales=2, res_blocks=1,
                                      features=4), config)
    assert calls == ([True] if keep else [])
