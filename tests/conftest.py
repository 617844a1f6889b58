"""Shared fixtures: the real datasets beside the checkout, and weight perturbation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from realnvp import BatchNormFlow, RealNVP, RealNVPConfig

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``; a missing copy fails the tests that need it (never skips)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"the real datasets are missing: {SHARED_DATA} does not exist")
    return SHARED_DATA


def perturb(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Move every parameter and batch-norm statistic away from its initial value.

    A model at initialisation is nearly the identity (zero last layers, unit running variances)
    and would hide bugs in inverses and log-determinants.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device))
        for m in module.modules():
            if isinstance(m, (BatchNormFlow, torch.nn.modules.batchnorm._BatchNorm)):
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return module


def small_image_model(shape=(3, 8, 8), scales=2, **overrides) -> RealNVP:
    """A tiny image model for exact checks (1 residual block, 4 features)."""
    settings = dict(input_shape=shape, scales=scales, res_blocks=1, features=4)
    return RealNVP(RealNVPConfig(**{**settings, **overrides}))




def calibrate(model: RealNVP, x: torch.Tensor) -> RealNVP:
    """Set every running batch-norm statistic to the statistics of batch ``x`` (as training
    leaves them), then switch to eval mode. Random statistics in a deep random ResNet make its
    s/t networks amplify rounding errors a thousandfold, which no trained model does."""
    saved = {}
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            saved[m] = m.momentum
            m.momentum = None  # cumulative average: one batch sets the statistics
            m.reset_running_stats()
        elif isinstance(m, BatchNormFlow):
            saved[m] = m.momentum
            m.momentum = 1.0
    model.train()
    with torch.no_grad():
        model.log_prob(x, check=False)
    for m, momentum in saved.items():
        m.momentum = momentum
    return model.eval()


class CountHostSyncs(TorchDispatchMode):
    """Counts the operators that make the host wait for the device's result
    (``_local_scalar_dense``: .item(), bool() and float() of a tensor; ``is_nonzero``)."""

    syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.syncs += func.overloadpacket.__name__ in ("_local_scalar_dense", "is_nonzero")
        return func(*args, **(kwargs or {}))


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    """Every test starts from the same global RNG state, so model initialisations repeat."""
    torch.manual_seed(0)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A skipped test is a failure here: every test must run (data and dependencies are part of
    the set-up), so a missing file or package cannot pass unnoticed."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and reporter.stats.get("skipped"):
        reporter.write_line(f"{len(reporter.stats['skipped'])} test(s) skipped: failing the run")
        session.exitstatus = 1
