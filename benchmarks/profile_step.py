"""Where the time of one training step goes: convolutions against everything else.

    python benchmarks/profile_step.py --preset cifar10 --batch-size 64 --mode fp32

Runs the benchmark's training step (benchmarks/bench.py) under torch.profiler and sums the
operators' own time per category. The convolutions are the useful work; the rest (batch norm,
ReLU, element-wise arithmetic, weight normalisation, the optimizer) is what a faster
implementation can remove. Like bench.py, run it on a quiet machine; it prints the load.

``--bound`` also times every convolution shape of the model on its own (forward, input gradient
and weight gradient apart) and adds them up: the speed of a step in which nothing but the
convolutions took time, the most any eager implementation of this architecture can reach on
the machine. It then measures bench.py's convolution ceiling in the same process and prints
the step's and the bound's share of it.
"""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402  (the benchmark's model, objective and training step)

# operator name (substring) → category; the first match wins
CATEGORIES = [
    ("convolution_backward", "convolution, backward"),
    ("convolution", "convolution, forward"),
    ("batch_norm", "batch norm (s/t nets)"),
    ("threshold_backward", "ReLU"),
    ("clamp_min", "ReLU"),
    ("relu", "ReLU"),
    ("weight_norm", "weight norm"),
    ("adam", "optimizer"),
    ("Optimizer", "optimizer"),
    ("cat", "cat / copies"),
    ("copy", "cat / copies"),
    ("var_mean", "flow batch norm statistics"),
    ("lerp", "flow batch norm statistics"),
]


def category(name: str) -> str:
    return next((c for key, c in CATEGORIES if key in name), "element-wise and other")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cifar10")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--mode", default="fp32", help="a bench.py mode, e.g. fp32, bf16+nchw")
    parser.add_argument("--steps", type=int, default=2, help="profiled steps (after 2 warm-up)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--shapes", action="store_true",
                        help="also a table of the convolutions' GFLOP/s per weight shape "
                        "(recording shapes slows the profiled step: compare shapes, not totals)")
    parser.add_argument("--bound", action="store_true",
                        help="also time every convolution of the model alone, outside the "
                        "model: the training speed the step would have if nothing but its "
                        "convolutions took time")
    parser.add_argument("--in-step", action="store_true",
                        help="also time every operator call of unprofiled steps on its own "
                        "(no profiler): the convolutions' time inside the step, to set against "
                        "--bound, and the time between the operators")
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    if args.threads:
        torch.set_num_threads(args.threads)
    busy = bench.machine_busy()
    device = torch.device("cpu")
    error = bench.mode_error(args.mode, "cpu")
    if error:
        parser.error(f"bad mode {args.mode!r}: {error}")
    mode = set(args.mode.split("+"))
    if "jemalloc" in mode:  # an allocator is chosen at process start: start again with it
        from realnvp.allocator import restart_with_jemalloc

        try:
            restart_with_jemalloc(sys.argv[1:], [str(Path(__file__).resolve())])
        except ValueError as jemalloc_error:
            parser.error(str(jemalloc_error))
    model, loss_fn, optimizer = bench.build(args.preset, mode, device, quick=False)
    step = bench.make_train_step(model, loss_fn, optimizer)
    images = torch.randint(0, 256, (args.batch_size, *model.config.input_shape),
                           dtype=torch.uint8)
    model.train()
    gflop = bench.flop_per_image(model, device) / 1e9
    meter = bench.LoadMeter()
    step(images)  # warm-up, untimed, twice: the allocator's pools and oneDNN's kernels
    step(images)
    before = resource.getrusage(resource.RUSAGE_SELF)
    wall = bench.timed(lambda: step(images), device, 0, args.steps)
    after = resource.getrusage(resource.RUSAGE_SELF)
    faults = (after.ru_minflt + after.ru_majflt - before.ru_minflt - before.ru_majflt) / args.steps
    kernel_s = (after.ru_stime - before.ru_stime) / args.steps
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
        for _ in range(args.steps):
            step(images)
    others = meter.others()

    totals: dict[str, float] = {}
    for event in prof.key_averages():
        if event.key.startswith("autograd::engine") or event.key.startswith("Optimizer.zero"):
            continue  # wrappers: their own time is bookkeeping, the work is in the ops inside
        name = category(event.key)
        totals[name] = totals.get(name, 0.0) + event.self_cpu_time_total / 1e3 / args.steps
    everything = sum(totals.values())
    step_s = min(wall)
    print(f"{args.preset}, batch {args.batch_size}, mode {args.mode}, "
          f"{torch.get_num_threads()} threads; machine {100 * busy:.0f}% busy before, other "
          f"processes used {100 * others:.0f}% of the CPUs during the run")
    print(f"step {step_s:.3f} s unprofiled ({args.batch_size / step_s:.2f} img/s); "
          f"{gflop:.2f} forward GFLOP/img; per step {faults:,.0f} page faults and "
          f"{kernel_s:.2f} s of kernel time (getrusage)\n")
    print("| category | ms / step | share |\n|---|---|---|")
    for name, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {ms:.1f} | {100 * ms / everything:.1f}% |")
    conv_ms = totals.get("convolution, forward", 0) + totals.get("convolution, backward", 0)
    if conv_ms:
        rate = 3 * gflop * args.batch_size / (conv_ms / 1e3)
        print(f"\nconvolutions alone: {rate:.0f} GFLOP/s (3 × forward FLOPs over their time); "
              f"the step as a whole: {3 * gflop * args.batch_size / step_s:.0f} GFLOP/s")
    if args.shapes:
        print_conv_shapes(prof, args.steps)
    if args.in_step:
        print_in_step_times(lambda: step(images), args.steps)
    if args.bound:
        bound_s, _ = print_convolution_bound(model, images, args.batch_size, gflop)
        # the ceiling of bench.py, measured now: the machine's speed drifts over an hour
        precision = bench.precision_of(args.mode)
        ceiling = bench.ceiling_for_mode("cpu", False, args.mode)
        flop = 3 * gflop * args.batch_size
        print(f"\n{precision} forward+backward 3×3-convolution ceiling measured now: {ceiling:.0f} "
              f"GFLOP/s; the step at {100 * flop / step_s / ceiling:.0f} % of it, its "
              f"convolutions alone at {100 * flop / bound_s / ceiling:.0f} %")
    return 0


def print_in_step_times(run_step, steps: int) -> None:
    """Wall-clock time of every operator call of ``steps`` training steps, each call timed on
    its own, summed per category.

    A dispatch mode sees every ATen call, forward and backward (on the CPU the autograd engine
    runs the backward on the calling thread), and CPU kernels are synchronous, so the time
    around a call is the kernel's. Unlike the profiler's self time it includes nothing of the
    calls nested in it. What is left of the step's wall time is spent between the operators:
    Python, autograd's bookkeeping and this measurement's own overhead (an upper bound).
    Observing changes one thing: every result passes through Python, and autograd sums the
    gradients of a tensor used several times in place only into a buffer nothing else refers
    to, so here those sums become out-of-place additions (``add`` instead of ``add_``;
    element-wise time an unobserved step does not spend).
    """
    import time

    from torch.utils._python_dispatch import TorchDispatchMode

    totals: dict[str, float] = {}

    class TimeEachCall(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            start = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            name = category(func.overloadpacket.__name__)
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - start
            return out

    start = time.perf_counter()
    with TimeEachCall():
        for _ in range(steps):
            run_step()
    wall = (time.perf_counter() - start) / steps
    totals = {name: seconds / steps for name, seconds in totals.items()}
    ops = sum(totals.values())
    print("\n| category (every call timed, no profiler) | ms / step | share of the step |"
          "\n|---|---|---|")
    for name, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {1e3 * seconds:.1f} | {100 * seconds / wall:.1f}% |")
    between = wall - ops
    print(f"| between the operators | {1e3 * between:.1f} | {100 * between / wall:.1f}% |")
    conv = totals.get("convolution, forward", 0.0) + totals.get("convolution, backward", 0.0)
    print(f"\nconvolutions inside the step: {conv:.2f} s of {wall:.2f} s per step")


def print_convolution_bound(model, images, batch_size: int,
                            gflop: float) -> tuple[float, float]:
    """Time each of the model's convolution shapes alone, in the layout the model runs it in:
    its forward pass, its input gradient and its weight and bias gradients, each on its own
    (the backward passes repeated on one retained graph); add them up over the model. Returns
    (seconds, FLOPs) per step of those convolutions, forward and both gradients.

    The three directions are printed apart because oneDNN's kernels for them differ: on the
    CPUs measured here the weight gradient is the slowest of the three."""
    import collections

    import torch
    import torch.nn.functional as F

    from realnvp import dequantize
    from realnvp.networks import WeightNormConv2d

    counts: collections.Counter = collections.Counter()
    hooks = [m.register_forward_pre_hook(
        lambda mod, args: counts.update([(tuple(args[0].shape), tuple(mod.weight_v.shape),
                                          args[0].is_contiguous())]))
        for m in model.modules() if isinstance(m, WeightNormConv2d)]
    with torch.no_grad():
        model.log_prob(dequantize(images), check=False)
    for h in hooks:
        h.remove()
    print("\n| input | weight | layout | per step | ms each (all three) | forward GFLOP/s "
          "| input gradient | weight gradient | all three |\n"
          "|---|---|---|---|---|---|---|---|---|")
    directions = ("forward", "input gradient", "weight gradient")
    per_direction = dict.fromkeys(directions, 0.0)  # seconds per step
    total_flop = 0.0
    bf16 = model.precision == "bf16"  # then the model's convolutions run under autocast
    for (x_shape, w_shape, nchw), count in sorted(counts.items()):
        fmt = torch.contiguous_format if nchw else torch.channels_last
        x = torch.randn(x_shape).contiguous(memory_format=fmt).requires_grad_()
        w = torch.randn(w_shape).requires_grad_()
        b = torch.zeros(w_shape[0], requires_grad=True)
        padding = w_shape[2] // 2
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            out = F.conv2d(x, w, b, padding=padding)  # the graph the gradients are timed on
        grad = torch.randn(out.shape, dtype=out.dtype).contiguous(memory_format=fmt)

        def forward(x=x, w=w, b=b, padding=padding, bf16=bf16):
            with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                F.conv2d(x, w, b, padding=padding)

        def input_gradient(out=out, x=x, grad=grad):
            torch.autograd.grad(out, (x,), grad, retain_graph=True)

        def weight_gradient(out=out, w=w, b=b, grad=grad):
            torch.autograd.grad(out, (w, b), grad, retain_graph=True)

        seconds = [min(bench.timed(f, torch.device("cpu"), 2, 5))
                   for f in (forward, input_gradient, weight_gradient)]
        flop = 2 * x_shape[0] * x_shape[2] * x_shape[3] * w_shape[0] * w_shape[1] \
            * w_shape[2] * w_shape[3]  # of one direction: the three cost the same
        for direction, s in zip(directions, seconds):
            per_direction[direction] += count * s
        total_flop += count * 3 * flop
        rates = " | ".join(f"{flop / s / 1e9:.0f}" for s in seconds)
        print(f"| {list(x_shape)} | {list(w_shape)} | {'NCHW' if nchw else 'NHWC'} | {count} "
              f"| {1e3 * sum(seconds):.1f} | {rates} | {3 * flop / sum(seconds) / 1e9:.0f} |")
    total_s = sum(per_direction.values())
    split = ", ".join(f"{d} {s:.2f} s" for d, s in per_direction.items())
    print(f"\nconvolutions alone, each timed on its own: {total_s:.2f} s per step ({split}), "
          f"{total_flop / total_s / 1e9:.0f} GFLOP/s, {batch_size / total_s:.2f} img/s (the "
          f"bound of a step whose other work took no time; {3 * gflop * batch_size:.0f} GFLOP "
          f"per step by the flop counter, {total_flop / 1e9:.0f} in these convolutions)")
    return total_s, total_flop


def print_conv_shapes(prof, steps: int) -> None:
    """Time and GFLOP/s of the convolutions per (input, weight) shape, forward and backward."""
    rows: dict[tuple, list[float]] = {}
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key == "aten::convolution_backward":
            x, w, direction, work = event.input_shapes[1], event.input_shapes[2], "backward", 2
        elif event.key in ("aten::mkldnn_convolution", "aten::_convolution_depthwise"):
            x, w, direction, work = event.input_shapes[0], event.input_shapes[1], "forward", 1
        else:
            continue
        n, _, h, width = x  # stride 1 and "same" padding: the output is h × width
        flop = work * 2 * n * h * width * w[0] * w[1] * w[2] * w[3] * event.count / steps
        ms = event.self_cpu_time_total / 1e3 / steps
        row = rows.setdefault((tuple(x), tuple(w), direction), [0.0, 0.0])
        row[0], row[1] = row[0] + ms, row[1] + flop
    print("\n| input | weight | direction | ms / step | GFLOP/s |\n|---|---|---|---|---|")
    for (x, w, direction), (ms, flop) in sorted(rows.items(), key=lambda kv: -kv[1][0]):
        print(f"| {list(x)} | {list(w)} | {direction} | {ms:.1f} | {flop / ms / 1e6:.0f} |")


if __name__ == "__main__":
    sys.exit(main())
