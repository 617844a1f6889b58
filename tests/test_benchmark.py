"""benchmarks/bench.py runs end to end (``--quick``: a tiny model) and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


def test_quick_benchmark_writes_every_documented_key(tmp_path):
    out = tmp_path / "bench.json"
    # --max-busy 1: never wait for a quiet machine here (the numbers of --quick are no results)
    done = subprocess.run(
        [sys.executable, str(BENCH), "--preset", "cifar10", "--batch-size", "8", "--quick",
         "--modes", "fp32,bf16+malloc-trim,invertible", "--max-busy", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    for precision in ("fp32", "bf16"):
        assert 0 < result["ceilings"][precision]["fwd_bwd"] <= 2 * \
            result["ceilings"][precision]["fwd"]
    rows = {row["mode"]: row for row in result["rows"]}
    assert set(rows) == {"fp32", "bf16+malloc-trim", "invertible"}
    for row in rows.values():
        for key in ("train_img_s", "eval_img_s", "sample_img_s", "peak_rss_mib",
                    "gflop_per_img", "conv_fraction"):
            assert row[key] > 0, (row["mode"], key)
        # the flop counter on the tiny model (1 residual block, 8 features): same in every mode
        assert row["gflop_per_img"] == rows["fp32"]["gflop_per_img"]
        expected = 3 * row["gflop_per_img"] * row["train_img_s"] / result["ceilings"][
            "bf16" if "bf16" in row["mode"] else "fp32"]["fwd_bwd"]
        assert abs(row["conv_fraction"] - expected) < 1e-3
    assert "| fp32 |" in done.stdout and "QUICK RUN" in done.stdout


def test_device_checks_pass_here_on_the_cpu():
    # benchmarks/device_checks.py is the prepared run for a lent GPU; its checks, on a tiny
    # model on the CPU, are the test suite's own bounds and must pass here.
    sys.path.insert(0, str(BENCH.parent))
    import device_checks
    import torch

    results = device_checks.checks("cifar10", torch.device("cpu"), quick=True)
    assert len(results) == 6
    for what, measured, bound in results:
        assert measured <= bound, (what, measured, bound)
