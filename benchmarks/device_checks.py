"""The GPU checks and the GPU benchmark table, as one prepared run for a lent CUDA machine.

    python3 benchmarks/device_checks.py --out $OUT            # on the GPU machine
    python benchmarks/device_checks.py --device cpu --quick   # here: checks the script itself

Runs from a checkout without installing it (``src`` goes on ``sys.path``), under whatever
PyTorch the machine has. First the correctness checks that the CPU test suite makes, on the
device, each printed with its measured error and bound: bf16 against fp32 bits/dim, the
exactness of decode(encode(x)), BN → ReLU recomputation against storing, ordinary and
memory-saving backpropagation in float32 against ordinary backpropagation in float64, and (on
CUDA) that the trainer's steps never make the host wait for the GPU. Then
``benchmarks/bench.py`` on the device. The checks (``checks-DEVICE.json``), the benchmark's
JSON and its table (``bench-PRESET-DEVICE.json`` and ``.md``) go to ``--out``. Exit status 1 if
a check failed or raised (the table is still measured).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "benchmarks")]

import bench  # noqa: E402
import torch  # noqa: E402

from realnvp import RealNVP, bits_per_dim, dequantize  # noqa: E402

GPU_MODES = ("fp32,tf32,bf16,fp32+recompute,bf16+recompute,invertible,checkpoint,compile,"
             "bf16+compile")


def calibrated_model(preset: str, device: torch.device, quick: bool) -> RealNVP:
    """The preset's model with perturbed weights and the batch-norm statistics of one batch, so
    that it is not the near-identity of its initialisation."""
    torch.manual_seed(0)
    overrides = dict(res_blocks=1, features=8) if quick else {}
    model = RealNVP.from_preset(preset, **overrides).to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
        model.train()
        for _ in range(3):  # running averages near this distribution's statistics
            model.log_prob(dequantize(images(model, 64, device)), check=False)
    return model.eval()


def images(model: RealNVP, n: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(1)
    return torch.randint(0, 256, (n, *model.config.input_shape), dtype=torch.uint8,
                         device=device, generator=g)


def worst_relative_error(grads: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """max over parameters of ‖g − g_ref‖ / max(‖g_ref‖, 1e-3 · ‖all of g_ref‖), as
    tests/test_memory.py measures it: gradients that vanish in exact arithmetic (biases of
    convolutions that feed a train-mode batch norm) are rounding noise, compared with the size
    of the whole gradient instead of their own."""
    total = torch.sqrt(sum(g.pow(2).sum() for g in reference))
    return max(float((g - r).norm() / torch.maximum(r.norm(), 1e-3 * total))
               for g, r in zip(grads, reference))


def gradients(model: RealNVP, x: torch.Tensor, mode: str, recompute: bool) -> list[torch.Tensor]:
    """Gradients of one training step's mean negative log-likelihood, in the model's dtype."""
    model = copy.deepcopy(model).set_memory_mode(mode, recompute_activations=recompute).train()
    (-model.log_prob(x, check=False).mean()).backward()
    return [p.grad.clone() for p in model.parameters()]


def checks(preset: str, device: torch.device, quick: bool) -> Iterator[tuple[str, float, float]]:
    """(what, measured, bound) for each check as it is made, in true float32 (no TF32 on
    CUDA).

    The gradients are compared with ordinary backpropagation in float64. On the full cifar10
    model in float32 ordinary backpropagation itself is about 6e-3 from it on its worst
    parameter (measured on the CPU, 2026-12-01), so each mode's bound is twice ordinary
    backpropagation's own error, at least 1e-3.
    """
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    model = calibrated_model(preset, device, quick)
    x = dequantize(images(model, 16 if quick else 64, device))
    dims = x[0].numel()
    with torch.inference_mode():
        fp32 = bits_per_dim(model.set_precision("fp32").log_prob(x), dims).mean()
        bf16 = bits_per_dim(model.set_precision("bf16").log_prob(x), dims).mean()
        model.set_precision("fp32")
        yield ("bf16 vs fp32 bits/dim, |difference|", float((bf16 - fp32).abs()), 0.01)
        z = model.encode(x)
        error = float((model.decode(z) - x).abs().max())
        yield ("decode(encode(x)) − x, max |error| (fp32)", error, 1e-3)
    small = x[:8]
    stored = gradients(model, small, "none", recompute=False)
    recomputed = gradients(model, small, "none", recompute=True)
    # the same kernels on the same inputs: equal up to the convolutions' own nondeterminism
    yield ("BN → ReLU recomputed vs stored, worst relative gradient difference",
           worst_relative_error(recomputed, stored), 1e-4)
    exact = [g.double() for g in gradients(copy.deepcopy(model).double(), small.double(),
                                           "none", recompute=False)]
    ordinary = worst_relative_error([g.double() for g in stored], exact)
    yield ("ordinary backprop (fp32) vs float64, worst relative gradient error",
           ordinary, 1e-2)
    for mode in ("invertible", "checkpoint"):
        grads = [g.double() for g in gradients(model, small, mode, recompute=True)]
        yield (f"memory mode {mode} (fp32) vs float64, worst relative gradient error",
               worst_relative_error(grads, exact), max(1e-3, 2 * ordinary))
    what = "host syncs in" if device.type == "cuda" else "(CPU: syncs not counted) failures of"
    yield f"{what} 3 of the trainer's steps (next batch and step)", trainer_step_syncs(device), 0


def trainer_step_syncs(device: torch.device) -> int:
    """How many of 3 training steps of realnvp.train.Trainer (on the bundled MNIST digits)
    made the host wait for the GPU: ``torch.cuda.set_sync_debug_mode("error")`` raises at the
    first synchronising call, so this is 0 or the step at which it happened. On the CPU the
    same steps run, uncounted (tests/test_train.py counts the CPU's syncs)."""
    import tempfile
    from unittest import mock

    from realnvp import RealNVPConfig
    from realnvp.train import TrainConfig, Trainer

    # The run's config.toml is not needed here, and its writer (tomli-w) is not installed on
    # the lent GPU machines.
    with tempfile.TemporaryDirectory() as run_dir, mock.patch("realnvp.train.write_config"):
        trainer = Trainer(RealNVPConfig(input_shape=(1, 28, 28), scales=2, res_blocks=1,
                                        features=8),
                          TrainConfig(run_dir=run_dir, batch_size=16, device=str(device),
                                      progress=False))
        trainer.model.train()
        trainer.training_step(*trainer.next_batch(), 1e-3)  # Adam's state, cuDNN's choices
        if device.type != "cuda":
            for _ in range(3):
                trainer.training_step(*trainer.next_batch(), 1e-3)
            return 0
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode("error")
        step = 0
        try:
            while step < 3:
                step += 1
                trainer.training_step(*trainer.next_batch(), 1e-3)
        except RuntimeError as error:
            if "synchroniz" not in str(error):  # another failure is not a sync to count
                raise
            print(f"  step {step} synchronised: {error}", flush=True)
            return step
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--preset", default="cifar10")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--modes", default=GPU_MODES)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--quick", action="store_true",
                        help="a tiny model and a CPU-sized table: checks this script")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device is visible to this PyTorch")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {name}", flush=True)

    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for result in checks(args.preset, device, args.quick):
            results.append(result)
    except Exception:  # the table is still measured; the error is one more failed check
        traceback.print_exc()
        results.append(("the checks ran to the end", math.nan, 0.0))
    failed = 0
    record = []
    for what, measured, bound in results:
        ok = measured <= bound  # NaN fails
        failed += not ok
        record.append({"check": what, "measured": None if math.isnan(measured) else measured,
                       "bound": bound, "passed": ok})
        print(f"{'PASS' if ok else 'FAIL'}  {what}: {measured:.3g} (bound {bound:g})", flush=True)
    print(f"checks: {time.perf_counter() - start:.0f} s", flush=True)
    (args.out / f"checks-{device.type}.json").write_text(json.dumps(record, indent=2) + "\n")

    # bench.py measures each mode in a subprocess, which must find the package too
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                             os.environ.get("PYTHONPATH")]))
    modes = [m for m in args.modes.split(",")
             if device.type == "cuda" or "tf32" not in m.split("+")]  # tf32 is CUDA's
    out_json = args.out / f"bench-{args.preset}-{device.type}.json"
    argv = ["--preset", args.preset, "--batch-size", str(args.batch_size), "--device",
            args.device, "--modes", ",".join(modes), "--json", str(out_json)]
    if device.type == "cuda":  # the CPU-load gate: brief on a GPU machine's short lease
        argv += ["--wait-load", "20"]
    bench_status = bench.main(argv + (["--quick", "--max-busy", "1"] if args.quick else []))
    if out_json.is_file():  # the table beside the JSON, as the device tool returns files
        rows = json.loads(out_json.read_text())["rows"]
        (args.out / f"bench-{args.preset}-{device.type}.md").write_text(bench.table(rows) + "\n")
    return 1 if failed or bench_status else 0


if __name__ == "__main__":
    sys.exit(main())
