"""Speed and memory of Real NVP training, evaluation and sampling, against this machine's own
3×3-convolution ceiling.

    python benchmarks/bench.py --preset cifar10 --batch-size 64 --json bench.json
    python benchmarks/bench.py --preset cifar10 --batch-size 64 --json q.json --quick
    python benchmarks/bench.py --modes fp32,invertible --measure-max-batch --json m.json

Every measurement runs in a fresh subprocess (``--worker``), so that peak memory of one mode
never mixes with another's. A mode is a ``+``-joined list of options:

    fp32 | bf16 | tf32   precision of the s/t networks (tf32: CUDA only, TF32 convolutions)
    invertible | checkpoint   memory-saving backpropagation (RealNVP.set_memory_mode)
    recompute            the s/t networks recompute every BN → ReLU in the backward pass
                         instead of storing it (recompute_activations=True; the memory-saving
                         modes do it anyway)
    nchw                 the s/t networks in the NCHW memory format (the default is
                         channels_last: RealNVP.set_memory_format)
    compile              torch.compile of the loss (training and evaluation; sampling eager)
    malloc-trim          glibc's malloc with its default thresholds, which return freed memory
                         to the kernel; without it (or malloc-release) the worker keeps freed
                         memory for reuse, as the trainer does (realnvp.allocator, "keep")
    malloc-release       glibc's malloc returns every block above 128 KiB to the kernel when it
                         is freed (realnvp.allocator, "release"): the lowest peak memory
    jemalloc             the worker runs with LD_PRELOAD=libjemalloc.so.2 and, unless
                         MALLOC_CONF is set, MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1
                         (CPU memory allocator: less fragmentation than glibc's malloc, so
                         less peak memory; freed pages kept, not returned to the kernel,
                         because every returned page costs a page fault when reused)

What each number means is in docs/benchmarks.md. The training step is the library's own
objective (``bits_per_dim(model.log_prob(dequantize(x)))`` plus the paper's L2 penalty),
backpropagation, gradient clipping at 100 and an Adam step; the images are random uint8
pixels (the speed of the model does not depend on the pixel values).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_MODES = ("fp32+malloc-trim,fp32+nchw+recompute,fp32,fp32+recompute,bf16,bf16+recompute,"
                 "invertible+malloc-trim,invertible,checkpoint,invertible+jemalloc,"
                 "checkpoint+jemalloc,bf16+invertible+jemalloc,compile,bf16+compile")
MEMORY_LIMIT_MIB = 8 * 1024  # the "largest batch that fits in 8 GiB" column
MAX_BATCH_TOLERANCE = 0.03  # --measure-max-batch: a peak this close under the limit settles it
OPTIONS = {"fp32", "bf16", "tf32", "invertible", "checkpoint", "nchw", "compile", "jemalloc",
           "recompute", "malloc-trim", "malloc-release"}
MALLOC_OPTIONS = {"malloc-trim": "system", "malloc-release": "release", "jemalloc": "jemalloc"}
PRECISION_OPTIONS = {"fp32", "bf16", "tf32"}
MEMORY_OPTIONS = {"invertible", "checkpoint"}


def mode_error(mode: str, device: str) -> str | None:
    """Why ``mode`` cannot be measured (None if it can): an unknown option, tf32 off CUDA, or
    options that contradict each other (two precisions, two memory modes, two allocators, or
    recompute under compile, which picks its own recomputation)."""
    options = set(mode.split("+"))
    if options - OPTIONS:
        return f"unknown {', '.join(sorted(options - OPTIONS))}; options are " \
               f"{', '.join(sorted(OPTIONS))}"
    if "tf32" in options and device != "cuda":
        return "tf32 is for CUDA only"
    for group in (PRECISION_OPTIONS, MEMORY_OPTIONS, set(MALLOC_OPTIONS)):
        if len(options & group) > 1:
            return f"at most one of {', '.join(sorted(group))}"
    if {"compile", "recompute"} <= options:
        return "recompute does not apply under compile (torch.compile picks its own)"
    return None


# -- load on the machine ----------------------------------------------------------------------


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine since boot, in clock ticks (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal
    return total - idle, total


def own_cpu_seconds() -> float:
    """CPU time of this process and its finished children, in seconds."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class LoadMeter:
    """Fraction of the machine's CPU time used by *other* processes between start and stop:
    (busy time of all CPUs − this process's CPU time) / (wall time × CPUs)."""

    def __init__(self) -> None:
        self.busy0, self.total0 = cpu_jiffies()
        self.own0 = own_cpu_seconds()

    def others(self) -> float:
        busy, total = cpu_jiffies()
        if total == self.total0:
            return 0.0
        tick = os.sysconf("SC_CLK_TCK")
        own_ticks = (own_cpu_seconds() - self.own0) * tick
        return max(0.0, (busy - self.busy0 - own_ticks) / (total - self.total0))


def machine_busy(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy over the next ``seconds`` (this process is asleep)."""
    meter = LoadMeter()
    time.sleep(seconds)
    return meter.others()


def wait_for_quiet(max_busy: float, max_wait: float) -> dict[str, Any]:
    """Wait up to ``max_wait`` seconds for the machine to be at most ``max_busy`` busy."""
    start = time.monotonic()
    busy = machine_busy()
    while busy > max_busy and time.monotonic() - start < max_wait:
        busy = machine_busy(2.0)
    quiet = busy <= max_busy
    if not quiet:
        print(f"WARNING: the machine is {100 * busy:.0f}% busy with other work after waiting "
              f"{max_wait:.0f} s; the timings below are not representative", file=sys.stderr)
    return {"busy_before": round(busy, 3), "waited_s": round(time.monotonic() - start, 1),
            "quiet": quiet, "loadavg_before": [round(v, 2) for v in os.getloadavg()]}


# -- the measurements (worker side) -----------------------------------------------------------


def memory_key(row: dict[str, Any]) -> str:
    """The field of a row whose peak the memory line and the 8 GiB search use: the process's
    peak resident memory on the CPU, the CUDA caching allocator's peak reservation on a GPU
    (rows written before ``device`` was recorded are the CPU's)."""
    return "peak_gpu_reserved_mib" if row.get("device") == "cuda" else "peak_rss_mib"


def peak_memory(device) -> dict[str, float]:
    """Peak resident memory of this process (``peak_rss_mib``, the host's, on every device)
    and, on CUDA, the peak GPU memory allocated and reserved by PyTorch, in MiB (the CUDA
    context, about 0.5 GiB, comes on top of the reservation)."""
    import torch

    peaks = {"peak_rss_mib": round(peak_rss_mib(), 1)}
    if device.type == "cuda":
        peaks["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        peaks["peak_gpu_reserved_mib"] = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
    return peaks


def peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB (VmHWM)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def timed(fn, device, warmup: int, iters: int, calls: int = 1) -> list[float]:
    """Wall-clock seconds per call of fn, ``iters`` times, after ``warmup`` untimed calls; each
    time is that of ``calls`` calls in a row between two device syncs, divided by ``calls``
    (on a GPU one short kernel timed alone would measure its launch and the sync)."""
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync()
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        times.append((time.perf_counter() - t) / calls)
    return times


def conv_ceiling(device_name: str, quick: bool, precisions: list[str] | None = None,
                 layouts: tuple[str, ...] = ("nchw", "cl"),
                 directions: tuple[str, ...] = ("fwd", "fwd_bwd")) -> dict[str, Any]:
    """GFLOP/s of large 3×3 convolutions of the cifar10 model's sizes, forward and forward +
    backward (input and weight gradients: 3× the forward FLOPs), per precision and layout, at
    batch 64 (``quick``: batch 8, as bf16 emulated on a CPU without AVX-512 BF16 runs at a
    tenth of fp32). ``precisions`` default: fp32, bf16 and, on CUDA, tf32."""
    import torch
    import torch.nn.functional as F

    device = torch.device(device_name)
    if precisions is None:
        precisions = ["fp32", "bf16"] + (["tf32"] if device.type == "cuda" else [])
    shapes = [(64, 32), (128, 16)]  # (channels, size): 64→64 at 32×32, 128→128 at 16×16
    batch = 8 if quick else 64
    detail = []
    tf32_before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    for precision in precisions:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        if device.type == "cuda":
            torch.backends.cudnn.allow_tf32 = precision == "tf32"
            torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        for channels, size in shapes:
            for layout in layouts:
                fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
                x = torch.randn(batch, channels, size, size, device=device, dtype=dtype)
                w = torch.randn(channels, channels, 3, 3, device=device, dtype=dtype) * 0.05
                x, w = x.to(memory_format=fmt), w.to(memory_format=fmt)
                flop = 2 * channels * channels * 9 * size * size * batch
                for direction in directions:
                    train = direction == "fwd_bwd"
                    xi, wi = x.detach().requires_grad_(train), w.detach().requires_grad_(train)
                    # the output gradient in the layout of the output, as autograd passes it
                    grad = torch.ones(batch, channels, size, size, device=device, dtype=dtype)
                    grad = grad.contiguous(memory_format=fmt)

                    def run(xi=xi, wi=wi, train=train, grad=grad):
                        y = F.conv2d(xi, wi, padding=1)
                        if train:
                            torch.autograd.grad(y, (xi, wi), grad)

                    # 20 convolutions a time on a GPU: each takes about 10-100 µs there
                    times = timed(run, device, 1 if quick else 3, 2 if quick else 8,
                                  calls=20 if device.type == "cuda" else 1)
                    rate = flop * (3 if train else 1) / min(times) / 1e9
                    detail.append({"precision": precision, "channels": channels, "size": size,
                                   "layout": layout, "direction": direction,
                                   "gflop_s": round(rate, 1)})
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32_before
    best = {p: {d: max(r["gflop_s"] for r in detail if r["precision"] == p
                       and r["direction"] == d) for d in directions}
            for p in precisions}
    return {**best, "detail": detail,
            "note": f"best of the two shapes and the layouts {', '.join(layouts)} at batch "
                    f"{batch}; bf16 with bf16 tensors"}


def build(preset: str, mode: set[str], device, quick: bool):
    """The model, its training objective and an optimizer, configured for ``mode``."""
    import torch

    from realnvp import RealNVP, dequantize
    from realnvp.allocator import set_malloc_policy
    from realnvp.train import Objective, TrainConfig

    recipe = TrainConfig()  # the training defaults: the paper's L2, learning rate, betas, clip
    set_malloc_policy(malloc_policy(mode))
    overrides = dict(res_blocks=1, features=8) if quick else {}
    model = RealNVP.from_preset(preset, **overrides).to(device)
    model.set_precision("bf16" if "bf16" in mode else "fp32")
    model.set_memory_mode("invertible" if "invertible" in mode else
                          "checkpoint" if "checkpoint" in mode else "none",
                          recompute_activations=("recompute" in mode) or None)
    model.set_memory_format("contiguous" if "nchw" in mode else "channels_last")
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = "tf32" in mode
        torch.backends.cuda.matmul.allow_tf32 = "tf32" in mode
    # The trainer's own loss (bits/dim + L2), compiled as `realnvp train --compile` compiles it.
    objective = Objective(model, recipe.l2)
    if "compile" in mode:
        objective = torch.compile(objective)

    def loss_fn(images):
        """(loss, mean bits/dim) of a batch of uint8 images."""
        return objective(dequantize(images), None)

    fused = {"fused": True} if device.type in ("cpu", "cuda") else {}
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr,
                                 betas=(recipe.beta1, recipe.beta2), **fused)
    return model, loss_fn, optimizer


def malloc_policy(mode: set[str]) -> str:
    """The malloc policy (realnvp.allocator) of a mode: the trainer's default unless an
    allocator option says otherwise."""
    from realnvp.train import TrainConfig

    chosen = {MALLOC_OPTIONS[o] for o in mode & MALLOC_OPTIONS.keys()}
    return chosen.pop() if chosen else TrainConfig.malloc


def make_train_step(model, loss_fn, optimizer):
    """One training step as the paper's recipe has it: bits/dim + 5e-5·Σ(weight-norm
    magnitudes² and tanh scales²), backpropagation, gradient-norm clipping at 100, Adam."""
    import torch

    from realnvp.train import TrainConfig

    clip = TrainConfig().grad_clip
    params = [p for p in model.parameters() if p.requires_grad]

    def step(images):
        optimizer.zero_grad(set_to_none=True)
        loss, _ = loss_fn(images)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        return loss.detach()  # no .item(): no host sync inside the step

    return step


def make_eval_step(model, compile_it: bool, images):
    """The evaluation's work on a batch: mean bits/dim of the eval-mode model (no L2 penalty,
    no gradients), compiled separately in the compile mode."""
    import torch

    from realnvp import bits_per_dim, dequantize

    dims = images[0].numel()

    def bpd(x):
        return bits_per_dim(model.log_prob(dequantize(x), check=False), dims).mean()

    compiled = torch.compile(bpd) if compile_it else bpd

    def evaluate():
        with torch.inference_mode():
            return compiled(images)

    return evaluate


def flop_per_image(model, device) -> float:
    """Forward FLOPs per image of the eval-mode density (convolutions and matmuls, as counted
    by torch.utils.flop_counter), from a batch of 2."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from realnvp import dequantize

    images = torch.randint(0, 256, (2, *model.config.input_shape), dtype=torch.uint8,
                           device=device)
    was_training = model.training
    model.eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.log_prob(dequantize(images), check=False)
    model.train(was_training)
    return counter.get_total_flops() / 2


def ceiling_for_mode(device: str, quick: bool, mode_name: str) -> float:
    """:func:`ceiling_now` in the precision of mode ``mode_name``, in a process that runs that
    mode: with freed memory kept while it is measured where the mode releases it (release
    would page-fault every tensor of the ceiling's convolutions), then the mode's policy again.
    glibc's defaults (``malloc-trim``) cannot be restored once changed, so those rows measure
    it under their own policy (no measurable difference: 229 against 227 and 213 against 213
    GFLOP/s, docs/bench-cifar10.json)."""
    from realnvp.allocator import set_malloc_policy

    mode = set(mode_name.split("+"))
    if malloc_policy(mode) == "release":
        set_malloc_policy("keep")
    try:
        return ceiling_now(device, quick, precision_of(mode_name))
    finally:
        if malloc_policy(mode) == "release":
            set_malloc_policy("release")


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Measure one mode (or the ceiling) in this process; returns the JSON row."""
    # torch.compile would otherwise compile in a pool of subprocesses whose CPU time the load
    # meter would count as other processes' load.
    if args.device == "cpu":
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    from realnvp.allocator import keep_freed_memory, loaded_allocator

    if args.worker == "ceiling":
        # the rows' allocator setting, so that page faults cannot lower the ceiling either
        keep_freed_memory()
        return conv_ceiling(args.device, args.quick)
    mode = set(args.worker.split("+"))
    model, loss_fn, optimizer = build(args.preset, mode, device, args.quick)
    images = torch.randint(0, 256, (args.batch_size, *model.config.input_shape),
                           dtype=torch.uint8, device=device)
    step = make_train_step(model, loss_fn, optimizer)
    model.train()
    warmup, iters = row_steps(args)
    if args.memory_only:  # a peak alone, after this many steps (glibc's peak still grows)
        timed(lambda: step(images), device, args.memory_only - 1, 1)
        return peak_memory(device)

    row: dict[str, Any] = {"mode": args.worker, "device": device.type,
                           "batch_size": args.batch_size,
                           "threads": torch.get_num_threads(), "allocator": loaded_allocator(),
                           "malloc_policy": malloc_policy(mode),
                           "malloc_conf": os.environ.get("MALLOC_CONF")}
    meter = LoadMeter()
    start = time.perf_counter()
    first = timed(lambda: step(images), device, 0, 1)[0]  # includes compilation, if any
    steps = timed(lambda: step(images), device, warmup - 1, iters)
    row["train_img_s"] = args.batch_size * len(steps) / sum(steps)
    row["train_step_s"] = [round(t, 3) for t in steps]
    if "compile" in mode:
        row["compile_s"] = round(first - min(steps), 1)
    row.update(peak_memory(device))
    # The machine's speed drifts by several per cent over a run: the ceiling once more, right
    # after this row's training steps, in its precision and the faster (channels-last) layout.
    row["ceiling_fwd_bwd_here"] = ceiling_for_mode(args.device, args.quick, args.worker)

    model.eval()
    evaluate = make_eval_step(model, "compile" in mode, images)

    evals = timed(evaluate, device, 1, max(1, iters // 2))
    row["eval_img_s"] = args.batch_size * len(evals) / sum(evals)
    if "compile" in mode:  # sampling runs the inverse, which is not compiled
        row["sample_img_s"] = None
    else:
        samples = timed(lambda: model.sample(args.batch_size), device, 1, max(1, iters // 2))
        row["sample_img_s"] = args.batch_size * len(samples) / sum(samples)
    row["others_cpu"] = round(meter.others(), 3) if device.type == "cpu" else None
    row["wall_s"] = round(time.perf_counter() - start, 1)
    row["gflop_per_img"] = flop_per_image(model, device) / 1e9
    return row


# -- the driver ---------------------------------------------------------------------------------


def row_steps(args: argparse.Namespace) -> tuple[int, int]:
    """(warm-up, timed) training steps of a row, after its first step: the row's peak memory
    is read after 1 + warm-up − 1 + timed = warm-up + timed steps."""
    return (1, 1) if args.quick else (2, args.iters)


# The measured largest batch reads each peak after this many steps (a row's 7 would take hours
# at the batches that fit); under glibc the peak still grows a little after them.
MAX_BATCH_STEPS = 2


def run_worker(args: argparse.Namespace, name: str, batch_size: int,
               memory_steps: int = 0) -> dict[str, Any] | None:
    """Run one worker process: the full row (``memory_steps`` 0) or only the peak memory
    after ``memory_steps`` training steps."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name,
           "--preset", args.preset, "--batch-size", str(batch_size), "--device", args.device,
           "--iters", str(args.iters)]
    cmd += ["--quick"] if args.quick else []
    cmd += ["--memory-only", str(memory_steps)] if memory_steps else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    env = dict(os.environ)
    if "jemalloc" in name.split("+"):
        from realnvp.allocator import jemalloc_environment

        env = jemalloc_environment(env)
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        print(f"WARNING: worker {name} (batch {batch_size}) failed:\n{result.stderr[-3000:]}",
              file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


# The instruction sets that decide the convolution ceilings: AVX2 only (fp32 at about a sixth
# of an AVX-512 core's rate, bf16 emulated), AVX-512, its BF16 dot products, Intel's AMX tiles.
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_description() -> dict[str, Any]:
    """The CPU's name, family and model, and which of :data:`CPU_FEATURES` it has, from
    /proc/cpuinfo (the name alone may be just "Intel(R) Xeon(R) Processor"); {} elsewhere."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if not key.strip():  # the end of the first CPU's block
                    break
                fields[key.strip()] = value.strip()
    except OSError:
        return {}
    flags = set(fields.get("flags", "").split())
    return {"cpu": fields.get("model name", platform.processor()),
            "cpu_family": fields.get("cpu family"), "cpu_model": fields.get("model"),
            "cpu_features": [name for name in CPU_FEATURES if name in flags]}


def machine_info(device: str) -> dict[str, Any]:
    info = {"cpu": platform.processor(), **cpu_description(), "cpus": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(),
            "device": device}
    probe = ("import torch, json; print(json.dumps({'torch': torch.__version__, "
             "'threads': torch.get_num_threads(), 'gpu': torch.cuda.get_device_name() "
             "if torch.cuda.is_available() else None}))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    if out.returncode == 0:
        info.update(json.loads(out.stdout))
    return info


def ceiling_now(device_name: str, quick: bool, precision: str) -> float:
    """The forward+backward ceiling (GFLOP/s) of one precision, channels_last (the faster layout
    here) only: a second measurement inside a run, against the machine's drift."""
    return conv_ceiling(device_name, quick, [precision], ("cl",), ("fwd_bwd",))[precision][
        "fwd_bwd"]


def precision_of(mode: str) -> str:
    """The s/t networks' precision in a mode: bf16, tf32 or fp32."""
    options = mode.split("+")
    return "bf16" if "bf16" in options else "tf32" if "tf32" in options else "fp32"


def add_derived(row: dict[str, Any], ceilings: dict[str, Any], half: dict | None,
                half_batch: int) -> None:
    """conv_fraction (training FLOP rate over the fwd+bwd ceiling of the same precision),
    conv_fraction_here (over the ceiling measured right after the row's training steps),
    eval_conv_fraction, and the memory extrapolation to 8 GiB."""
    ceiling = ceilings.get(precision_of(row["mode"])) if ceilings else None
    gflop = row["gflop_per_img"]
    if ceiling:
        row["conv_fraction"] = round(3 * gflop * row["train_img_s"] / ceiling["fwd_bwd"], 3)
        row["eval_conv_fraction"] = round(gflop * row["eval_img_s"] / ceiling["fwd"], 3)
    else:
        row["conv_fraction"] = row["eval_conv_fraction"] = None
    row["conv_fraction_here"] = round(
        3 * gflop * row["train_img_s"] / row["ceiling_fwd_bwd_here"], 3)
    # Peak memory is close to linear in the batch size (activations) plus a constant (weights,
    # optimizer state, the framework): two batch sizes fix the line.
    row["max_batch_8gib"] = None
    key = memory_key(row)
    if half is not None:
        for name in half:
            row[f"{name}_half_batch"] = half[name]
        row["max_batch_8gib"] = batch_on_line((half_batch, half[key]),
                                              (row["batch_size"], row[key]),
                                              MEMORY_LIMIT_MIB)


def batch_on_line(first: tuple[int, float], second: tuple[int, float],
                  peak: float) -> int | None:
    """The batch (rounded down) at which the straight line through two (batch, peak MiB)
    points reaches ``peak``: 0 if even a batch of 1 would not fit, None if the line does not
    rise (or a point is a failed step's infinite peak)."""
    (b1, p1), (b2, p2) = first, second
    if p2 <= p1 or not math.isfinite(p2):
        return None
    return max(0, int(b2 + (peak - p2) * (b2 - b1) / (p2 - p1)))


def largest_fitting(points: list[tuple[int, float]], limit: float = MEMORY_LIMIT_MIB,
                    tolerance: float = MAX_BATCH_TOLERANCE
                    ) -> tuple[tuple[int, float] | None, bool]:
    """The largest measured (batch, peak MiB) that fits in ``limit``, and whether it settles
    the question: its peak is within ``tolerance`` of the limit, or the batch one above it was
    measured not to fit."""
    fits = [pt for pt in sorted(points) if pt[1] <= limit]
    if not fits:
        return None, False
    best = fits[-1]
    over = {b for b, p in points if p > limit}
    return best, best[1] >= (1 - tolerance) * limit or best[0] + 1 in over


def search_max_batch(peak_at: Callable[[int], float], points: list[tuple[int, float]],
                     limit: float = MEMORY_LIMIT_MIB, tries: int = 3,
                     tolerance: float = MAX_BATCH_TOLERANCE,
                     first: int | None = None) -> list[tuple[int, float]]:
    """Measure the largest batch whose training step peaks at most ``limit`` MiB.

    ``points`` are measured (batch, peak MiB) pairs, at least two; ``peak_at(batch)`` measures
    one more (``inf`` if the step failed, e.g. out of memory). Each try interpolates linearly
    between the largest batch that fits and the smallest that does not (regula falsi), or
    extrapolates from the two nearest points, aiming at ``(1 - tolerance / 2) · limit``; it
    stops when :func:`largest_fitting` says the question is settled or after ``tries``
    measurements. ``first``, if given, is the first batch measured instead of the line's (a
    guess from an earlier run: the line through two small batches can be far off when the
    allocator's overhead dominates their peaks). Returns every point, sorted.
    """
    points = sorted(points)
    target = (1 - tolerance / 2) * limit
    for attempt in range(tries):
        lo, settled = largest_fitting(points, limit, tolerance)
        if settled:
            break
        hi = min((pt for pt in points if pt[1] > limit), default=None)
        finite = [pt for pt in points if math.isfinite(pt[1])]
        if attempt == 0 and first is not None:
            batch = first
        elif hi and hi[1] == math.inf:  # the step failed there: bisect
            batch = ((lo[0] if lo else 0) + hi[0]) // 2
        elif len(finite) < 2:
            break
        else:
            batch = batch_on_line(*((lo, hi) if lo and hi else finite[-2:] if lo
                                    else finite[:2]), target)
            if batch is None:
                break  # memory does not grow with the batch here: nothing to aim at
        if lo and hi:
            batch = min(max(batch, lo[0] + 1), hi[0] - 1)
        batch = max(batch, 1)
        if any(b == batch for b, _ in points):
            break
        points = sorted([*points, (batch, peak_at(batch))])
    return points


def measure_max_batch(args: argparse.Namespace, row: dict[str, Any], half_batch: int) -> None:
    """Add the measured largest batch in 8 GiB (search_max_batch on fresh memory-only
    workers) to a row: ``max_batch_8gib_measured``, ``max_batch_8gib_settled`` (see
    largest_fitting) and every (batch, peak MiB) pair, the row's two included, in
    ``max_batch_8gib_points``."""
    def peak_at(batch: int) -> float:
        print(f"[{row['mode']}] peak memory at batch {batch}", file=sys.stderr)
        measured = run_worker(args, row["mode"], batch, MAX_BATCH_STEPS)
        return math.inf if measured is None else measured[key]

    key = memory_key(row)
    points = search_max_batch(peak_at, [(half_batch, row[f"{key}_half_batch"]),
                                        (row["batch_size"], row[key])],
                              tries=args.max_batch_tries, first=args.max_batch_first)
    best, settled = largest_fitting(points)
    # a failed step's peak (inf) as null: JSON has no infinity
    row["max_batch_8gib_points"] = [[b, p if p < math.inf else None] for b, p in points]
    row["max_batch_8gib_measured"] = best[0] if best else None
    row["max_batch_8gib_settled"] = settled


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def max_batch(row: dict[str, Any]) -> str:
    """The table's entry: the measured largest batch if there is one, else the estimate, with *."""
    if row.get("max_batch_8gib_measured") is not None:  # ≥: the search stopped short of 8 GiB
        prefix = "" if row["max_batch_8gib_settled"] else "≥"
        return f"{prefix}{row['max_batch_8gib_measured']}"
    return "—" if row["max_batch_8gib"] is None else f"{row['max_batch_8gib']}*"


def table(rows: list[dict[str, Any]]) -> str:
    gpu = any(r.get("device") == "cuda" for r in rows)
    memory = "peak GPU MiB (reserved)" if gpu else "peak RSS MiB"
    head = (f"| mode | train img/s | eval img/s | sample img/s | {memory} | GFLOP/img "
            "| conv fraction (train) | same, ceiling at the row | max batch in 8 GiB "
            "| others' CPU |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        others = r.get("others_cpu")
        lines.append(
            f"| {r['mode']} | {fmt(r['train_img_s'], 2)} | {fmt(r['eval_img_s'], 2)} "
            f"| {fmt(r['sample_img_s'], 2)} | {fmt(r[memory_key(r)], 0)} "
            f"| {fmt(r['gflop_per_img'], 2)} | {fmt(r['conv_fraction'], 2)} "
            f"| {fmt(r.get('conv_fraction_here'), 2)} | {max_batch(r)} "
            f"| {'—' if others is None else f'{100 * others:.0f}%'} |"
        )
    return "\n".join(lines)


def write_json(path: Path | None, result: dict[str, Any]) -> None:
    """Write the results atomically (a temporary file, then a rename), after every row: a run
    stopped midway keeps what it measured, marked ``"complete": false``."""
    from realnvp.checkpoint import atomic_write_text

    if path is not None:
        atomic_write_text(path, json.dumps(result, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cifar10")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--modes", default=DEFAULT_MODES,
                        help=f"comma-separated modes (default: {DEFAULT_MODES})")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true",
                        help="a tiny model and one timed iteration: checks that the script "
                             "works; its numbers are not results")
    parser.add_argument("--iters", type=int, default=5, help="timed training steps per mode")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--max-busy", type=float, default=0.05,
                        help="the machine counts as quiet when other processes use at most "
                             "this fraction of its CPUs")
    parser.add_argument("--wait-load", type=float, default=300,
                        help="seconds to wait for a quiet machine before each measurement")
    parser.add_argument("--measure-max-batch", action="store_true",
                        help="measure the largest batch in 8 GiB (peak memory of a training "
                             "step at batches aimed at 8 GiB) instead of only extrapolating it")
    parser.add_argument("--max-batch-tries", type=int, default=3,
                        help="with --measure-max-batch: at most this many batches per mode")
    parser.add_argument("--max-batch-first", type=int, default=None,
                        help="with --measure-max-batch: the first batch to measure (every "
                             "mode), e.g. from an earlier run, instead of the line through "
                             "the row's two batches")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--memory-only", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    if args.iters < 1:
        parser.error(f"--iters must be at least 1, got {args.iters}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        options = set(m.split("+"))
        error = mode_error(m, args.device)
        if error:
            parser.error(f"bad mode {m!r}: {error}")
        if "jemalloc" in options:
            from realnvp.allocator import jemalloc_environment

            try:
                jemalloc_environment()
            except ValueError as error:
                parser.error(f"mode {m!r}: {error}")
    if args.device == "cpu" and not Path("/proc/stat").exists():
        parser.error("load monitoring needs Linux /proc")

    result: dict[str, Any] = {
        "machine": machine_info(args.device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/bench.py",
                             *(sys.argv[1:] if argv is None else argv)]),
        "quick": args.quick, "preset": args.preset, "batch_size": args.batch_size,
        "load": {"per_measurement": []}, "complete": False, "rows": [], "failed": [],
    }
    load = result["load"]

    def quiet(name: str) -> None:
        state = wait_for_quiet(args.max_busy, args.wait_load)
        load["per_measurement"].append({"what": name, **state})
        print(f"[{name}] machine {100 * state['busy_before']:.0f}% busy before "
              f"(load average {state['loadavg_before'][0]}), waited {state['waited_s']} s",
              file=sys.stderr)

    quiet("ceiling")
    ceilings = run_worker(args, "ceiling", args.batch_size)
    result["ceilings"] = ceilings
    if ceilings is None:
        result["failed"].append("ceiling")
    if ceilings:
        for p in ("fp32", "bf16", "tf32"):
            if p in ceilings:
                print(f"3×3 conv ceiling {p}: {ceilings[p]['fwd']:.0f} GFLOP/s forward, "
                      f"{ceilings[p]['fwd_bwd']:.0f} forward+backward", file=sys.stderr)

    rows = result["rows"]
    half_batch = max(1, args.batch_size // 2)
    for mode in modes:
        quiet(mode)
        row = run_worker(args, mode, args.batch_size)
        if row is None:
            result["failed"].append(mode)
            write_json(args.json, result)
            continue
        half = None
        if "compile" not in mode and half_batch < args.batch_size:  # batch 1: no second point
            half = run_worker(args, mode, half_batch, sum(row_steps(args)))  # as the row
            if half is None:
                result["failed"].append(f"{mode} (batch {half_batch}, memory only)")
        add_derived(row, ceilings, half, half_batch)
        if args.measure_max_batch and half is not None:
            measure_max_batch(args, row, half_batch)
        rows.append(row)
        write_json(args.json, result)
        print(f"[{mode}] train {row['train_img_s']:.2f} img/s, peak "
              f"{row[memory_key(row)]:.0f} MiB, others used "
              f"{100 * (row['others_cpu'] or 0):.0f}% of the CPUs",
              file=sys.stderr)
    result["load"]["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    noisy = [r["mode"] for r in rows if (r.get("others_cpu") or 0) > args.max_busy]
    result["load"]["noisy_modes"] = noisy
    if noisy:
        print(f"WARNING: other processes used more than {100 * args.max_busy:.0f}% of the CPUs "
              f"while measuring {', '.join(noisy)}: those timings are not representative",
              file=sys.stderr)

    machine = result["machine"]
    features = machine.get("cpu_features")  # absent: no /proc/cpuinfo to read them from
    title = (f"{args.preset}, batch {args.batch_size}, {machine.get('cpu')} (family "
             f"{machine.get('cpu_family')}, model {machine.get('cpu_model')}; "
             + ("features unknown" if features is None else " ".join(features) or
                f"none of {', '.join(CPU_FEATURES)}") + ")")
    if args.quick:
        title += " — QUICK RUN (tiny model): not results"
    print(f"\n{title}\n\n{table(rows)}\n\nmax batch: measured where it has no *; "
          f"* extrapolated linearly from the peak memory at batch {args.batch_size} and "
          f"{half_batch}")
    result["complete"] = True
    write_json(args.json, result)
    if result["failed"]:
        print(f"FAILED: {', '.join(result['failed'])} (see the workers' errors above)",
              file=sys.stderr)
    return 1 if result["failed"] or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
