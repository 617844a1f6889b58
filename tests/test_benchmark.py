"""benchmarks/bench.py runs end to end (``--quick``: a tiny model) and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"
sys.path.insert(0, str(BENCH.parent))  # bench, device_checks and profile_step import as modules


def test_quick_benchmark_writes_every_documented_key(tmp_path):
    out = tmp_path / "bench.json"
    # --max-busy 1: never wait for a quiet machine here (the numbers of --quick are no results)
    done = subprocess.run(
        [sys.executable, str(BENCH), "--preset", "cifar10", "--batch-size", "8", "--quick",
         "--modes", "fp32,bf16+malloc-trim,invertible", "--max-busy", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["complete"] and not out.with_name(out.name + ".partial").exists()
    for precision in ("fp32", "bf16"):
        assert 0 < result["ceilings"][precision]["fwd_bwd"] <= 2 * \
            result["ceilings"][precision]["fwd"]
    rows = {row["mode"]: row for row in result["rows"]}
    assert set(rows) == {"fp32", "bf16+malloc-trim", "invertible"}
    for row in rows.values():
        for key in ("train_img_s", "eval_img_s", "sample_img_s", "peak_rss_mib",
                    "gflop_per_img", "conv_fraction", "ceiling_fwd_bwd_here",
                    "conv_fraction_here"):
            assert row[key] > 0, (row["mode"], key)
        # the flop counter on the tiny model (1 residual block, 8 features): same in every mode
        assert row["gflop_per_img"] == rows["fp32"]["gflop_per_img"]
        expected = 3 * row["gflop_per_img"] * row["train_img_s"] / result["ceilings"][
            "bf16" if "bf16" in row["mode"] else "fp32"]["fwd_bwd"]
        assert abs(row["conv_fraction"] - expected) < 1e-3
        here = 3 * row["gflop_per_img"] * row["train_img_s"] / row["ceiling_fwd_bwd_here"]
        assert abs(row["conv_fraction_here"] - here) < 1e-3
    # each row's own ceiling is measured in the row's precision
    assert rows["bf16+malloc-trim"]["ceiling_fwd_bwd_here"] != rows["fp32"]["ceiling_fwd_bwd_here"]
    import bench

    assert [bench.precision_of(m) for m in ("fp32+malloc-trim", "bf16+invertible+jemalloc",
                                            "tf32+compile", "invertible")] == \
        ["fp32", "bf16", "tf32", "fp32"]
    assert "| fp32 |" in done.stdout and "QUICK RUN" in done.stdout
    assert [rows[m]["malloc_policy"] for m in ("fp32", "bf16+malloc-trim")] == \
        ["keep", "system"]
    # the CPU as /proc/cpuinfo describes its first core (the name alone can be a generic one)
    with open("/proc/cpuinfo") as f:
        first = f.read().split("\n\n")[0]
    fields = dict((k.strip(), v.strip()) for k, _, v in
                  (line.partition(":") for line in first.splitlines()))
    machine = result["machine"]
    if "flags" not in fields:  # not an x86 Linux: nothing of this to compare
        return
    assert (machine["cpu"], machine["cpu_family"], machine["cpu_model"]) == \
        (fields["model name"], fields["cpu family"], fields["model"])
    assert machine["cpu_features"] == [name for name in ("avx2", "avx512f", "avx512_bf16",
                                                         "amx_bf16") if name in
                                       fields["flags"].split()]
    assert f"family {fields['cpu family']}, model {fields['model']}" in done.stdout


def test_each_mode_has_one_allocator_policy(capsys):
    import bench
    import pytest

    assert [bench.malloc_policy(set(m.split("+"))) for m in (
        "fp32", "invertible+malloc-release", "checkpoint+malloc-trim", "bf16+jemalloc")] == \
        ["keep", "release", "system", "jemalloc"]
    with pytest.raises(SystemExit):
        bench.main(["--modes", "invertible+malloc-release+jemalloc", "--quick"])
    assert "at most one of jemalloc, malloc-release, malloc-trim" in capsys.readouterr().err


def test_device_checks_pass_here_on_the_cpu(monkeypatch):
    # benchmarks/device_checks.py is the prepared run for a lent GPU; its checks, on a tiny
    # model on the CPU, are the test suite's own bounds and must pass here, also without the
    # packages the GPU machines lack (tomli-w, which writes a run's config.toml).
    import device_checks
    import torch

    monkeypatch.setitem(sys.modules, "tomli_w", None)  # import tomli_w now raises
    results = list(device_checks.checks("cifar10", torch.device("cpu"), quick=True))
    assert len(results) == 7 and "trainer's steps" in results[-1][0]
    for what, measured, bound in results:
        assert measured <= bound, (what, measured, bound)


def test_in_step_timing_separates_operators_from_the_time_between_them(capsys):
    # profile_step.py --in-step: every ATen call timed on its own, by category; the time spent
    # outside the operators (here a sleep) must land in "between the operators", not in them.
    import time

    import profile_step
    import torch
    import torch.nn.functional as F

    x = torch.randn(8, 16, 32, 32, requires_grad=True)
    w = torch.randn(16, 16, 3, 3, requires_grad=True)

    def step():
        y = F.relu(F.conv2d(x, w, padding=1))
        y.sum().backward()
        time.sleep(0.2)

    profile_step.print_in_step_times(step, steps=2)
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 3 and cells[1].replace(".", "").isdigit():
            rows[cells[0]] = float(cells[1])
    assert {"convolution, forward", "convolution, backward", "ReLU"} <= set(rows)
    assert rows["between the operators"] >= 200  # ms per step: the sleep
    assert 0 < rows["convolution, backward"] < 200


def test_convolution_bound_times_every_convolution_of_the_model(capsys):
    # profile_step.py --bound: the model's convolution shapes, each timed alone and counted per
    # step, must add up to every convolution FLOP the flop counter finds in the model.
    import bench
    import profile_step
    import torch

    from realnvp import RealNVP

    model = RealNVP.from_preset("cifar10", res_blocks=1, features=8).set_memory_format(
        "channels_last")
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    gflop = bench.flop_per_image(model, torch.device("cpu")) / 1e9
    seconds, flop = profile_step.print_convolution_bound(model, images, 4, gflop)
    out = capsys.readouterr().out
    assert seconds > 0
    assert abs(flop - 3 * gflop * 1e9 * 4) <= 1e-9 * flop  # every convolution, fwd + 2 grads
    # the checkerboard couplings at 32×32 and the channel-wise ones at 16×16 both appear
    assert "| [4, 8, 32, 32] |" in out and "| [4, 16, 16, 16] |" in out


def test_convolution_bound_times_each_direction_of_a_convolution_alone(capsys):
    # --bound prints the forward pass, the input gradient and the weight gradient apart: each
    # timed call must compute its own direction and nothing else (no forward pass hidden in a
    # backward timing, no weight gradient in the input gradient's).
    import profile_step
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from realnvp import RealNVP
    from realnvp.networks import WeightNormConv2d

    model = RealNVP.from_preset("cifar10", res_blocks=1, features=8).set_memory_format(
        "channels_last")
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    calls: list[tuple[bool, ...] | None] = []  # None: a forward convolution

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name == "convolution_backward":
                calls.append(tuple(args[-1]))  # output_mask: input, weight, bias
            elif name == "convolution":
                calls.append(None)
            return func(*args, **(kwargs or {}))

    with Record():
        profile_step.print_convolution_bound(model, images, 2, 1.0)
    shapes = sum(line.startswith("| [") for line in capsys.readouterr().out.splitlines())
    modules = sum(isinstance(m, WeightNormConv2d) for m in model.modules())
    assert shapes >= 2
    # per shape 2 warm-up and 5 timed calls of each direction, and one more forward pass that
    # records the graph the gradients are timed on; before them the model's own forward pass
    assert calls.count((True, False, False)) == 7 * shapes
    assert calls.count((False, True, True)) == 7 * shapes
    assert calls.count(None) == modules + 8 * shapes
    assert len(calls) == modules + 22 * shapes


def test_benchmark_training_step_never_waits_for_the_device():
    import bench
    import torch
    from conftest import CountHostSyncs

    model, loss_fn, optimizer = bench.build("cifar10", {"fp32"}, torch.device("cpu"), quick=True)
    step = bench.make_train_step(model, loss_fn, optimizer)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    step(images)  # Adam's state is created here
    with CountHostSyncs() as counter:
        loss = step(images)
    assert counter.syncs == 0 and torch.isfinite(loss)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_max_batch_search_lands_just_under_the_limit():
    import math

    import bench

    # a peak that grows faster than the line through batch 32 and 64 (allocator overhead):
    # extrapolating alone overshoots, the search must come back under the limit
    def peak(batch: int) -> float:
        return 300 + 40 * batch + 0.02 * batch**2

    calls = []

    def peak_at(batch: int) -> float:
        calls.append(batch)
        return peak(batch)

    limit = bench.MEMORY_LIMIT_MIB
    line = bench.search_max_batch(lambda b: math.inf, [(32, peak(32)), (64, peak(64))], tries=0)
    assert line == [(32, peak(32)), (64, peak(64))]  # no tries: nothing measured
    points = bench.search_max_batch(peak_at, [(32, peak(32)), (64, peak(64))])
    best, settled = bench.largest_fitting(points)
    true_max = max(b for b in range(1, 1000) if peak(b) <= limit)
    assert settled and best[1] <= limit and best[1] >= 0.97 * limit, points
    assert true_max - best[0] <= 0.03 * true_max and len(calls) <= 3
    extrapolated = 64 + (limit - peak(64)) * 32 / (peak(64) - peak(32))
    assert extrapolated > true_max + 5  # the line alone would have claimed too much

    # a step that fails (out of memory) above batch 150 is bisected, never counted as fitting
    def failing(batch: int) -> float:
        return math.inf if batch > 150 else 40 * batch

    points = bench.search_max_batch(failing, [(32, 1280), (64, 2560)], tries=8)
    best, settled = bench.largest_fitting(points)
    assert best == (150, 6000) and settled, points  # 151 failed, 150 fit
    # memory that does not grow: nothing to aim at, the search stops at once
    assert bench.search_max_batch(peak_at, [(32, 900), (64, 900)]) == [(32, 900), (64, 900)]

    # a first guess replaces the line's first try; the next tries go on from it
    calls.clear()
    points = bench.search_max_batch(peak_at, [(32, peak(32)), (64, peak(64))], first=100)
    best, settled = bench.largest_fitting(points)
    assert calls[0] == 100 and (100, peak(100)) in points and len(calls) <= 3
    assert settled and true_max - best[0] <= 0.03 * true_max, points


def test_measured_max_batch_goes_into_the_row_and_the_table(monkeypatch):
    import argparse

    import bench

    def fake_worker(args, name, batch_size, memory_steps=0):
        assert memory_steps == bench.MAX_BATCH_STEPS and name == "fp32"
        return None if batch_size > 180 else {"peak_rss_mib": 500.0 + 44 * batch_size}

    monkeypatch.setattr(bench, "run_worker", fake_worker)
    row = {"mode": "fp32", "batch_size": 64, "peak_rss_mib": 500.0 + 44 * 64,
           "peak_rss_mib_half_batch": 500.0 + 44 * 32, "max_batch_8gib": 174}
    bench.measure_max_batch(argparse.Namespace(max_batch_tries=3, max_batch_first=None), row, 32)
    fit = max(b for b in range(1000) if 500 + 44 * b <= bench.MEMORY_LIMIT_MIB)
    measured = row["max_batch_8gib_measured"]  # aimed at 98.5 % of the limit: 172 of 174
    assert 0.97 * fit <= measured <= fit and row["max_batch_8gib_settled"]
    assert [64, 500.0 + 44 * 64] in row["max_batch_8gib_points"]
    assert [measured, 500.0 + 44 * measured] in row["max_batch_8gib_points"]
    assert bench.max_batch(row) == str(measured)
    assert bench.max_batch({"max_batch_8gib": 174}) == "174*"  # extrapolated only
    row["max_batch_8gib_settled"] = False
    assert bench.max_batch(row) == f"≥{measured}"


def test_contradicting_modes_and_bad_iters_are_refused(capsys):
    import bench
    import pytest

    for mode, message in [("fp32+bf16", "at most one of bf16, fp32, tf32"),
                          ("invertible+checkpoint", "at most one of checkpoint, invertible"),
                          ("compile+recompute", "recompute does not apply under compile"),
                          ("fp16", "unknown fp16"), ("tf32", "tf32 is for CUDA only")]:
        assert message in bench.mode_error(mode, "cpu"), mode
        with pytest.raises(SystemExit):
            bench.main(["--modes", mode, "--quick"])
        assert message in capsys.readouterr().err
    assert bench.mode_error("bf16+invertible+recompute+jemalloc", "cpu") is None
    assert bench.mode_error("tf32+compile", "cuda") is None
    with pytest.raises(SystemExit):
        bench.main(["--modes", "fp32", "--quick", "--iters", "0"])
    assert "--iters must be at least 1" in capsys.readouterr().err


def test_max_batch_line_never_gives_a_batch_that_cannot_fit():
    import math

    import bench

    # the line through (32, 9000) and (64, 9500) reaches 8 GiB below batch 1: nothing fits
    assert bench.batch_on_line((32, 9000.0), (64, 9500.0), bench.MEMORY_LIMIT_MIB) == 0
    assert bench.batch_on_line((32, 900.0), (48, math.inf), bench.MEMORY_LIMIT_MIB) is None
    # nothing fits and the first guess fails: go below the smallest batch (a NaN line before)
    tried = []

    def peak_at(batch: int) -> float:
        tried.append(batch)
        return math.inf if batch >= 40 else 300.0 * batch

    points = bench.search_max_batch(peak_at, [(32, 9000.0), (64, 12000.0)], first=48, tries=4)
    assert tried[0] == 48 and tried[1] < 32, tried
    best, _ = bench.largest_fitting(points)
    assert best is not None and best[1] <= bench.MEMORY_LIMIT_MIB


def test_a_failed_mode_is_recorded_and_fails_the_run(tmp_path, monkeypatch):
    import bench

    def fake_worker(args, name, batch_size, memory_steps=0):
        if name == "ceiling":
            return {"fp32": {"fwd": 100.0, "fwd_bwd": 90.0}, "detail": []}
        # the half batch's peak after as many steps as the row's: first, warm-up, 5 timed
        assert memory_steps in (0, 7) and (memory_steps == 0) == (batch_size == 64)
        if name == "bf16" or (name == "fp32+recompute" and memory_steps):
            return None  # the worker crashed
        return {"mode": name, "batch_size": batch_size, "train_img_s": 1.0, "eval_img_s": 2.0,
                "sample_img_s": 2.0, "peak_rss_mib": 1000.0 + batch_size, "gflop_per_img": 1.0,
                "others_cpu": 0.0, "ceiling_fwd_bwd_here": 90.0}

    monkeypatch.setattr(bench, "run_worker", fake_worker)
    monkeypatch.setattr(bench, "wait_for_quiet", lambda *a: {"busy_before": 0.0, "waited_s": 0,
                                                             "quiet": True,
                                                             "loadavg_before": [0, 0, 0]})
    monkeypatch.setattr(bench, "machine_info", lambda device: {"cpu": "test"})
    out = tmp_path / "b.json"
    argv = ["--modes", "fp32,bf16,fp32+recompute", "--json", str(out)]
    assert bench.main(argv) == 1
    result = json.loads(out.read_text())
    assert result["failed"] == ["bf16", "fp32+recompute (batch 32, memory only)"]
    assert [r["mode"] for r in result["rows"]] == ["fp32", "fp32+recompute"]
    assert result["command"] == " ".join(["python", "benchmarks/bench.py", *argv])


def test_timed_runs_several_calls_between_syncs_and_divides():
    import bench
    import torch

    calls = []

    def two_milliseconds():
        calls.append(1)
        time.sleep(0.002)

    times = bench.timed(two_milliseconds, torch.device("cpu"), 2, 3, calls=5)
    assert len(calls) == 2 + 3 * 5 and len(times) == 3
    assert all(0.0019 <= t < 0.006 for t in times), times  # per call (5 calls: 10 ms a group)


def test_convolution_bound_of_a_bf16_mode_times_bf16_convolutions(monkeypatch, capsys):
    import profile_step
    import torch
    import torch.nn.functional as F

    from realnvp import RealNVP

    model = RealNVP.from_preset("cifar10", res_blocks=1, features=8).set_precision("bf16")
    dtypes = set()
    conv2d = F.conv2d

    def spy(*args, **kwargs):
        out = conv2d(*args, **kwargs)
        dtypes.add(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.functional, "conv2d", spy)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    profile_step.print_convolution_bound(model, images, 2, 1.0)
    assert dtypes == {torch.bfloat16}
