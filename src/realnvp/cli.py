"""The ``realnvp`` command line: train, eval, sample, demo (and the figure commands).

Configuration precedence for ``train``: the preset < a ``--config`` TOML file (sections [model]
and [train], as each run writes to RUN/config.toml; it sets only the keys it names) < options
on the command line. Running ``train`` again on a run directory that has checkpoints resumes
from the latest one, with the run's architecture (an option or file asking for another is
refused); the file's and the command line's training options (e.g. a larger ``--steps``)
override the recorded training configuration (RUN/config.toml, or the checkpoint's record).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .allocator import keep_freed_memory, loaded_allocator, restart_with_jemalloc
from .checkpoint import atomic_write_text, check_can_create
from .data import DATASETS, DEMO_DATA, TOY_DATASETS, load_dataset
from .distributed import pick_device
from .evaluate import evaluate
from .figures import make_grid, png_path, save_image_grid, save_png, side_by_side, upscale
from .model import PRECISIONS, PRESETS, RealNVP, RealNVPConfig, inference_precision, preset_config
from .train import (
    TrainConfig,
    Trainer,
    latest_checkpoint,
    load_run_dataset,
    read_config_tables,
    resolve_checkpoint,
    run_configs,
)

# The demo: real MNIST (the bundled test-set files: 9,000 to train, 1,000 held out), a model
# small enough to learn in about six minutes on two CPU cores. See README.md for its result.
DEMO_MODEL = dict(input_shape=(1, 28, 28), scales=2, res_blocks=1, features=16)
DEMO_TRAIN = dict(dataset="mnist-t10k", steps=3000, batch_size=32,
                  lr=2e-3, warmup_steps=100, lr_decay="cosine", eval_every=1000,
                  sample_every=1000, checkpoint_every=500, log_every=50)


def _field_type(tp: Any) -> tuple[type, bool]:
    """(scalar type, is_tuple) of a dataclass field annotation (Optional unwrapped)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _field_type(args[0])
    if origin is tuple:
        return typing.get_args(tp)[0], True
    if origin is typing.Literal:
        return str, False
    return tp, False


def _add_dataclass_options(parser: argparse.ArgumentParser, cls: type, skip: set[str],
                           title: str, default_from: str | None = None) -> None:
    """One ``--kebab-case`` option per field; unspecified options stay absent (SUPPRESS). The
    help shows the field's default, or ``default_from`` where another source sets it."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp, is_tuple = _field_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = f"(default: {default_from or default})"
        if tp is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=shown)
        else:
            group.add_argument(flag, type=tp, nargs="+" if is_tuple else None,
                               default=argparse.SUPPRESS, metavar=f.name.upper(), help=shown)


def _picked(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
              if hasattr(args, f.name)}
    if "input_shape" in values:
        values["input_shape"] = tuple(values["input_shape"])
    return values


def _int_at_least(low: int, meaning: str) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {meaning}, got {value}")
        return value
    parse.__name__ = "integer"  # argparse's "invalid integer value: 'x'"
    return parse


def _path_argument(check: Callable[[str], Path], what: str) -> Callable[[str], Path]:
    """An argparse type from a path check that raises ValueError (argparse wants its own
    error type to print the message)."""
    def parse(text: str) -> Path:
        try:
            return check(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    parse.__doc__ = f"An argparse type: {what}."
    return parse


png_argument = _path_argument(png_path, "a path to write a PNG to (realnvp.figures.png_path)")
output_file = _path_argument(check_can_create, "a file to write at the end (not a folder, "
                             "under no file)")


positive_int = _int_at_least(1, "a positive integer")
nonnegative_int = _int_at_least(0, "an integer >= 0")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="realnvp", description="Real NVP density models: train, evaluate, sample, figures.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model (resumes if RUN has checkpoints)",
                       description="Train with the paper's recipe; rerun on the same --run-dir "
                       "to resume from its latest checkpoint.")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="architecture of one of the paper's datasets (default: mnist, or the "
                   "checkpoint's when resuming)")
    p.add_argument("--config", type=Path, default=None,
                   help="a TOML file with [model] and [train] tables (e.g. RUN/config.toml)")
    _add_dataclass_options(p, TrainConfig, set(), "training options")
    _add_dataclass_options(p, RealNVPConfig, set(), "model options (override the preset)",
                           default_from="the preset's")

    p = sub.add_parser("eval", help="bits/dim of a dataset split in eval mode",
                       description="Print bits/dim (mean ± standard error over images) of a "
                       "split, in eval mode; --json writes it machine-readable.")
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="a checkpoint or model file, or a run directory (uses its best.pt)")
    p.add_argument("--dataset", default=None, choices=DATASETS + TOY_DATASETS,
                   help="default: the run's own dataset")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="the dataset's folder or file (default: the run's, for its dataset; "
                   "not needed for the 2-D toy datasets)")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    p.add_argument("--samples", type=positive_int, default=1,
                   help="dequantisation samples per image")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--max-images", type=positive_int, default=None)
    p.add_argument("--seed", type=int, default=0, help="seed of the dequantisation noise")
    p.add_argument("--valid-size", type=int, default=None,
                   help="validation slice size, as in training (default: the run's)")
    p.add_argument("--split-seed", type=nonnegative_int, default=None,
                   help="seed that chose the validation slice (default: the run's --seed)")
    p.add_argument("--device", default="auto")
    add_precision_option(p)
    p.add_argument("--json", type=output_file, default=None,
                   help="also write the result as JSON")

    p = sub.add_parser("sample", help="write a grid of samples as a PNG",
                       description="Draw n samples x = f^-1(z), z ~ N(0, T^2 I) and write them "
                       "as one PNG grid. With several temperatures, the same z is decoded at "
                       "each and the grids stand side by side, titled 'T = ...'. "
                       "Class-conditional models sample --label K, or (without it) the classes "
                       "in turn: sample i has class i mod K.")
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="a checkpoint or model file, or a run directory (uses its best.pt)")
    p.add_argument("-n", type=positive_int, default=64,
                   help="number of samples (per temperature)")
    p.add_argument("--temperature", type=float, nargs="+", default=[1.0], metavar="T",
                   help="std of the prior, T; several values give one panel each")
    p.add_argument("--label", type=int, default=None,
                   help="class to sample (class-conditional models)")
    p.add_argument("--nrow", type=positive_int, default=None, help="images per row")
    p.add_argument("--zoom", type=positive_int, default=1,
                   help="enlarge every image by this integer factor (nearest neighbour)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    add_precision_option(p)
    p.add_argument("--out", required=True, type=png_argument, help="PNG file to write")

    p = sub.add_parser("demo", help="train on the bundled MNIST files, evaluate, sample (~6 min)",
                       description="Train a small model on real MNIST (the bundled test-set "
                       "files: 9,000 images to train, 1,000 held out), print held-out bits/dim "
                       "and write samples. No download and no path to give.")
    p.add_argument("--run-dir", type=Path, default=Path("runs/demo"))
    p.add_argument("--steps", type=int, default=DEMO_TRAIN["steps"])
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)

    try:  # the paper's figures, when that module is present
        from .experiments import add_figure_commands
    except ImportError:
        pass
    else:
        add_figure_commands(sub)
    return parser


def _same(a: Any, b: Any) -> bool:
    """Equal config values, a TOML list and a tuple alike."""
    def as_list(v: Any) -> Any:
        return list(v) if isinstance(v, (list, tuple)) else v

    return as_list(a) == as_list(b)


def _train_configs(args: argparse.Namespace) -> tuple[RealNVPConfig, TrainConfig]:
    """Merge preset, --config file and command-line options; on resume, the run's own. The
    file's tables override only the keys they set."""
    cli_model, cli_train = _picked(args, RealNVPConfig), _picked(args, TrainConfig)
    file_model: dict[str, Any] = {}
    file_train: dict[str, Any] = {}
    if args.config is not None:
        file_model, file_train = read_config_tables(args.config)
    train = TrainConfig.from_dict({**file_train, **cli_train})
    run_dir = Path(train.run_dir)
    saved = run_configs(run_dir) if latest_checkpoint(run_dir) is not None else None
    if saved is not None:  # resume: the architecture is the run's; asking for another is an error
        saved_model, saved_train = saved
        asked = {**file_model, **cli_model}
        unknown = sorted(set(asked) - {f.name for f in dataclasses.fields(RealNVPConfig)})
        if unknown:
            raise ValueError(f"unknown RealNVPConfig fields: {', '.join(unknown)}")
        differ = {k: v for k, v in asked.items() if not _same(getattr(saved_model, k), v)}
        if args.preset is not None:
            preset = preset_config(args.preset).to_dict()
            differ.update({k: preset[k] for k in PRESETS[args.preset]
                           if k not in asked and not _same(preset[k], getattr(saved_model, k))})
        if differ:
            raise SystemExit(f"error: {run_dir} holds a run of another architecture "
                             f"({saved_model}); it differs in {sorted(differ)}. Use a new "
                             "--run-dir, or drop those options to resume.")
        train = TrainConfig.from_dict({**saved_train.to_dict(), **file_train, **cli_train,
                                       "run_dir": str(run_dir)})
        return saved_model, train
    preset = args.preset or "mnist"
    model = preset_config(preset, **{**file_model, **cli_model})
    return model, train


def cmd_train(args: argparse.Namespace) -> None:
    """Train on one process, or on every process torchrun starts (only rank 0 prints)."""
    model_config, train_config = _train_configs(args)
    if train_config.malloc == "jemalloc":  # an allocator can only be chosen at process start
        restart_with_jemalloc(args.argv)
    try:
        trainer = Trainer(model_config, train_config)
        main, world = trainer.dist.is_main, trainer.dist.world_size
        if main and trainer.resumed_from is not None:
            s = trainer.state
            before = trainer.resumed_world_size
            moved = f"; written by {before} process(es), continuing on {world}" \
                if before != world else ""
            print(f"resuming from {trainer.resumed_from} (step {s.step}, epoch {s.epoch}, "
                  f"image {s.epoch_offset}{moved})")
        if main:
            print(f"model: {trainer.model.num_parameters():,} parameters, {trainer.model.config}")
            print(f"malloc: {train_config.malloc} (allocator in use: {loaded_allocator()})")
        if main and world > 1:
            sync = "synchronised" if trainer.sync_batchnorm else "per-process"
            print(f"{world} processes ({trainer.device.type}) × batch "
                  f"{train_config.batch_size} = global batch {trainer.global_batch_size}; "
                  f"{sync} batch norm")
        state = trainer.run()
        unit = "bits/dim" if model_config.is_image else "nats"
        if main:
            best = "no validation (valid_size 0)" if trainer.valid_set is None else \
                f"best valid {state.best_valid_bpd:.4f} {unit}"
            print(f"done: step {state.step}, {best}, {state.nonfinite_steps} non-finite steps "
                  f"skipped; run in {train_config.run_dir}")
    finally:
        distributed.shutdown()


def add_precision_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=["auto", *PRECISIONS], default="auto",
                   help="arithmetic of the s/t networks; auto: bf16 where the device computes "
                   "it natively (bits/dim within about 1e-4 of fp32), else fp32")


def load_model(checkpoint: Path, device: str = "auto", precision: str = "fp32") -> RealNVP:
    """A model from a checkpoint/model file or a run directory (its best.pt), in eval mode,
    its s/t networks at ``precision`` ("auto": see :func:`realnvp.model.inference_precision`)."""
    device_ = pick_device(device)
    model = RealNVP.load(checkpoint, map_location=device_)  # a run directory resolved, eval mode
    if precision == "auto":
        precision = inference_precision(device_) if model._dtype() == torch.float32 else "fp32"
    return model.set_precision(precision)


def cmd_eval(args: argparse.Namespace) -> None:
    used = resolve_checkpoint(args.checkpoint)  # a run directory's best.pt (or latest)
    model = load_model(used, args.device, args.precision)
    args.dataset, dataset = load_run_dataset(args.checkpoint, args.dataset, args.data_dir,
                                             args.split, valid_size=args.valid_size,
                                             split_seed=args.split_seed)
    result = evaluate(model, dataset, batch_size=args.batch_size, samples=args.samples,
                      max_images=args.max_images, seed=args.seed)
    print(f"{args.dataset} {args.split}: {result} ({model.precision} s/t networks, {used})")
    if args.json is not None:
        record = {**result.to_dict(), "dataset": args.dataset, "split": args.split,
                  "precision": model.precision,
                  "checkpoint": str(used)}
        atomic_write_text(args.json, json.dumps(record, indent=2, allow_nan=False) + "\n")


def require_classes(model: RealNVP) -> None:
    """``--label K`` is for class-conditional models only."""
    if model.config.num_classes is None or model.config.label_kind != "class":
        raise ValueError("--label K needs a class-conditional model"
                         + ("; this one is conditional on attribute vectors"
                            if model.config.num_classes else ""))


def sampling_labels(model: RealNVP, n: int, label: int | None) -> torch.Tensor | None:
    """The classes of ``n`` samples: ``--label K`` for all of them, else the model's classes in
    turn (0, 1, …, K−1, 0, …); None for an unconditional model."""
    device = model._device()
    k, kind = model.config.num_classes, model.config.label_kind
    if label is not None:
        require_classes(model)
        return torch.full((n,), label, dtype=torch.long, device=device)
    if k is not None:
        if kind != "class":
            raise ValueError("an attribute-conditional model needs attribute vectors: use "
                             "realnvp swap-labels or the Python API (model.sample(cond=...))")
        return torch.arange(n, device=device) % k
    return None


def cmd_sample(args: argparse.Namespace) -> None:
    from .experiments import _generator, sample_temperatures

    model = load_model(args.checkpoint, args.device, args.precision)
    if not model.config.is_image:
        raise ValueError("sample writes images; for a 2-D vector model use realnvp toy")
    cond = sampling_labels(model, args.n, args.label)
    g = _generator(model, args.seed)
    temperatures = args.temperature
    images = upscale(sample_temperatures(model, args.n, temperatures, cond, g).cpu(), args.zoom)
    if len(temperatures) == 1:
        path = save_image_grid(images[0], args.out, args.nrow)
    else:
        panels = [make_grid(group, args.nrow) for group in images]
        path = save_png(side_by_side(panels, [f"T = {t:g}" for t in temperatures]), args.out)
    shown = ", ".join(f"{t:g}" for t in temperatures)
    print(f"wrote {args.n} samples at temperature {shown} to {path}")


def cmd_demo(args: argparse.Namespace) -> None:
    train_config = TrainConfig(**{**DEMO_TRAIN, "steps": args.steps, "run_dir": str(args.run_dir),
                                  "progress": args.progress})
    trainer = Trainer(RealNVPConfig(**DEMO_MODEL), train_config)
    print(f"demo: {trainer.model.num_parameters():,} parameters, {args.steps} steps of "
          f"{train_config.batch_size} on {len(trainer.train_set)} MNIST images")
    if trainer.resumed_from is not None:  # a run directory of an earlier demo
        print(f"resuming from {trainer.resumed_from} (step {trainer.state.step}); delete "
              f"{args.run_dir} to train from scratch")
    trainer.run()
    test = load_dataset("mnist-t10k", DEMO_DATA, "test")
    result = evaluate(trainer.model, test)
    print(f"held-out MNIST: {result}")
    atomic_write_text(args.run_dir / "result.json",
                      json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n")
    path = save_image_grid(trainer.model.sample(
        64, generator=torch.Generator().manual_seed(0)), args.run_dir / "samples.png")
    print(f"samples: {path}")


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # for a restart with another allocator (cmd_train)
    handler = COMMANDS.get(args.command) or getattr(args, "handler", None)
    if args.command not in ("train", "demo"):  # those follow TrainConfig.malloc
        keep_freed_memory()
    try:
        handler(args)
    except (ValueError, OSError, FloatingPointError) as error:  # bad input, files, divergence
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from error
    except KeyboardInterrupt:  # Ctrl-C: the trainer has said what it saved
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
