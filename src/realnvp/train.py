"""The training loop: the paper's recipe, atomic checkpoints and exact resume.

Recipe (SPEC section 3): Adam (lr 1e-3, betas 0.9/0.999), batch 64, loss = mean bits/dim of the
batch in train mode + 5e-5 · Σ v² over the weight-norm magnitudes and tanh scales, global
gradient-norm clipping at 100. A step whose loss or gradient norm is not finite is skipped
(parameters, optimiser and batch-norm statistics untouched) and counted; more than
``max_nonfinite`` of them abort the run.

Run directory::

    RUN/config.toml            model and training configuration (reproduces the run)
    RUN/checkpoints/ckpt-STEP.pt, best.pt    the last ``keep_checkpoints`` and the best
    RUN/samples/step-STEP.png  sample grids
    RUN/metrics.jsonl          one JSON object per logged step / evaluation
    RUN/tensorboard/           with ``tensorboard = true``

Exact resume: the data order is a permutation per epoch seeded by (seed, epoch); the
dequantisation noise and the augmentations draw from two generators whose states, with the
model, the optimiser, the batch-norm statistics and the step, are in every checkpoint. A run
restarted from a checkpoint therefore takes bit-for-bit the same steps as one never stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .checkpoint import CheckpointError, atomic_save, safe_load
from .data import ImageDataset, load_dataset
from .evaluate import evaluate
from .figures import save_image_grid
from .model import RealNVP, RealNVPConfig
from .preprocessing import bits_per_dim, dequantize

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib
import tomli_w

CHECKPOINT_FORMAT = "realnvp-checkpoint"
DEMO_DATA = Path(__file__).parent / "demo_data"


@dataclass
class TrainConfig:
    """Everything about a run except the architecture (that is :class:`RealNVPConfig`)."""

    dataset: str = "mnist-t10k"
    data_dir: str = str(DEMO_DATA)
    run_dir: str = "runs/default"
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    l2: float = 5e-5                # on weight-norm magnitudes and tanh scales
    grad_clip: float = 100.0        # global gradient-norm clipping
    warmup_steps: int = 0           # linear learning-rate warm-up
    lr_decay: str = "none"          # "none" or "cosine" (to 0 at the last step)
    conditional: bool = False       # condition on the dataset's labels
    valid_size: int | None = None   # size of the validation slice where the dataset has none
    eval_every: int = 500
    eval_images: int | None = None  # validation images per periodic evaluation (None: all)
    sample_every: int = 500
    sample_count: int = 64
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    max_nonfinite: int = 20
    seed: int = 0
    device: str = "auto"
    tensorboard: bool = False
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {', '.join(unknown)}")
        return cls(**d)


@dataclass
class RunState:
    """What a checkpoint holds beyond the model and the optimiser."""

    step: int = 0
    best_valid_bpd: float = math.inf
    nonfinite_steps: int = 0


# -- configuration files ------------------------------------------------------------------------

def _toml_ready(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}  # TOML has no null: absent = default


def write_config(path: Path, model: RealNVPConfig, train: TrainConfig) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = tomli_w.dumps({"model": _toml_ready(model.to_dict()),
                          "train": _toml_ready(train.to_dict())})
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def read_config(path: str | Path) -> tuple[RealNVPConfig, TrainConfig]:
    """Read a run's ``config.toml`` (sections [model] and [train])."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ValueError(f"{path}: cannot read the configuration ({error})") from error
    return (RealNVPConfig.from_dict(data.get("model", {})),
            TrainConfig.from_dict(data.get("train", {})))


# -- checkpoints --------------------------------------------------------------------------------

def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest ``ckpt-STEP.pt`` of a run, or None."""
    files = sorted(checkpoint_dir(run_dir).glob("ckpt-*.pt"))
    return files[-1] if files else None


def resolve_checkpoint(path: str | Path, prefer: str = "best") -> Path:
    """A checkpoint file, or a run directory → its ``best.pt`` (``prefer="best"``) or its
    latest checkpoint."""
    path = Path(path)
    if path.is_dir():
        best = checkpoint_dir(path) / "best.pt"
        latest = latest_checkpoint(path)
        chosen = best if prefer == "best" and best.is_file() else latest
        if chosen is None:
            raise CheckpointError(f"{path}: a run directory with no checkpoint in "
                                  f"{checkpoint_dir(path)}")
        return chosen
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file or run directory")
    return path


def _all_finite(module: torch.nn.Module) -> bool:
    return all(torch.isfinite(t).all() for t in [*module.parameters(), *module.buffers()]
               if t.is_floating_point())


def save_checkpoint(path: Path, model: RealNVP, optimizer: torch.optim.Optimizer,
                    state: RunState, train: TrainConfig, generators: dict[str, torch.Generator]
                    ) -> None:
    """Write a checkpoint atomically; refuses (raises) if the model holds a non-finite value, so
    a diverged state never replaces a good checkpoint."""
    if not _all_finite(model):
        raise FloatingPointError("the model holds non-finite parameters or statistics: "
                                 f"not writing {path}")
    atomic_save({
        "format": CHECKPOINT_FORMAT, "version": 1,
        "config": model.config.to_dict(), "state_dict": model.state_dict(),
        "train_config": _toml_ready(train.to_dict()),
        "optimizer": optimizer.state_dict(),
        "run_state": dataclasses.asdict(state),
        "rng": {name: g.get_state() for name, g in generators.items()},
    }, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read and check a training checkpoint (no arbitrary unpickling)."""
    payload = safe_load(path, CHECKPOINT_FORMAT, map_location)
    missing = {"config", "state_dict", "optimizer", "run_state", "rng"} - set(payload)
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {sorted(missing)}")
    return payload


# -- the loop -----------------------------------------------------------------------------------

def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """The dataset indices of training step ``step``: batch ``step % (n // B)`` of the epoch
    ``step // (n // B)`` permutation, seeded by (seed, epoch); the last partial batch is dropped."""
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise ValueError(f"the training split has {n} images, fewer than one batch of "
                         f"{batch_size}")
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return order[k * batch_size:(k + 1) * batch_size]


def learning_rate(train: TrainConfig, step: int) -> float:
    lr = train.lr
    if train.warmup_steps and step < train.warmup_steps:
        lr *= (step + 1) / train.warmup_steps
    if train.lr_decay == "cosine":
        lr *= 0.5 * (1 + math.cos(math.pi * min(step / max(train.steps, 1), 1.0)))
    elif train.lr_decay != "none":
        raise ValueError(f"lr_decay must be 'none' or 'cosine', got {train.lr_decay!r}")
    return lr


def _batchnorm_buffers(model: RealNVP) -> list[torch.Tensor]:
    return [b for name, b in model.named_buffers() if "running" in name or "num_batches" in name]


class Trainer:
    """One run: builds or resumes everything from ``run_dir``, then :meth:`run` trains."""

    def __init__(self, model_config: RealNVPConfig, train: TrainConfig,
                 resume: bool = True) -> None:
        self.train_config = train
        self.run_dir = Path(train.run_dir)
        self.device = pick_device(train.device)
        self.train_set = load_dataset(train.dataset, train.data_dir, "train", seed=train.seed,
                                      valid_size=train.valid_size)
        self.valid_set = load_dataset(train.dataset, train.data_dir, "valid", seed=train.seed,
                                      valid_size=train.valid_size)
        latest = latest_checkpoint(self.run_dir) if resume else None
        payload = load_checkpoint(latest, self.device) if latest else None
        if payload is not None:
            model_config = RealNVPConfig.from_dict(payload["config"])
        elif train.conditional:
            model_config = self._conditional_config(model_config, self.train_set)
        if tuple(self.train_set.image_shape) != model_config.input_shape:
            raise ValueError(f"dataset {train.dataset!r} has images of shape "
                             f"{tuple(self.train_set.image_shape)}, the model expects "
                             f"{model_config.input_shape}: choose a matching preset or set "
                             "input_shape")
        torch.manual_seed(train.seed)  # the model's initial weights
        self.model = RealNVP(model_config).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=train.lr,
                                          betas=(train.beta1, train.beta2))
        self.generators = {  # one stream for the dequantisation noise, one for augmentation
            "noise": torch.Generator(device=self.device).manual_seed(train.seed + 1),
            "augment": torch.Generator().manual_seed(train.seed + 2),
        }
        self.state = RunState()
        if payload is not None:
            self.model.load_state_dict(payload["state_dict"])
            self.optimizer.load_state_dict(payload["optimizer"])
            self.state = RunState(**payload["run_state"])
            for name, g in self.generators.items():
                g.set_state(payload["rng"][name].to("cpu"))
            self.resumed_from: Path | None = latest
            self._truncate_metrics(self.state.step)
        else:
            self.resumed_from = None
        write_config(self.run_dir / "config.toml", model_config, train)
        self.l2_params = self.model.l2_parameters()
        self.writer = None
        if train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # optional dependency

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))

    def _truncate_metrics(self, step: int) -> None:
        """Drop the records a killed run logged after its last checkpoint: they are redone."""
        path = self.run_dir / "metrics.jsonl"
        if path.is_file():
            lines = [line for line in path.read_text().splitlines()
                     if line.strip() and json.loads(line).get("step", 0) <= step]
            path.write_text("".join(line + "\n" for line in lines))

    @staticmethod
    def _conditional_config(config: RealNVPConfig, dataset: ImageDataset) -> RealNVPConfig:
        if dataset.num_classes is None:
            raise ValueError("--conditional needs a labelled dataset; this one has no labels")
        return dataclasses.replace(config, num_classes=dataset.num_classes,
                                   label_kind=dataset.label_kind or "class")

    def training_step(self, images: torch.Tensor, labels: torch.Tensor | None, lr: float
                      ) -> tuple[torch.Tensor, bool]:
        """One optimiser step on a uint8 image batch (or float vectors); returns (the mean train
        bits/dim, or nats for vectors, and whether the step was taken)."""
        model, opt, train = self.model, self.optimizer, self.train_config
        saved_stats = [b.clone() for b in _batchnorm_buffers(model)]
        cond = labels if model.config.num_classes else None
        if model.config.is_image:  # minimise bits/dim of dequantised pixels
            x = dequantize(images, generator=self.generators["noise"])
            bpd = bits_per_dim(model.log_prob(x, cond, check=False), x[0].numel()).mean()
        else:  # vectors: minimise the negative log-likelihood in nats
            bpd = -model.log_prob(images, cond, check=False).mean()
        loss = bpd + train.l2 * sum(p.pow(2).sum() for p in self.l2_params)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
            with torch.no_grad():  # undo the batch-norm update of the bad forward pass
                for buffer, saved in zip(_batchnorm_buffers(model), saved_stats):
                    buffer.copy_(saved)
            opt.zero_grad(set_to_none=True)
            return bpd.detach(), False
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        return bpd.detach(), True

    def log(self, record: dict) -> None:
        record = {"time": round(time.time(), 3), **record}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def evaluate(self) -> float:
        t = self.train_config
        return evaluate(self.model, self.valid_set, max_images=t.eval_images, seed=t.seed).mean

    def write_samples(self) -> Path:
        t = self.train_config
        g = torch.Generator(device=self.device).manual_seed(t.seed)  # the same z at every step
        cond = None
        if self.model.config.num_classes:
            cond = self.valid_set.get_batch(torch.arange(min(t.sample_count,
                                                             len(self.valid_set))))[1]
            cond = cond.to(self.device) if cond is not None else None
        n = t.sample_count if cond is None else cond.shape[0]
        images = self.model.sample(n, cond=cond, generator=g)
        return save_image_grid(images, self.run_dir / "samples" / f"step-{self.state.step:07d}.png")

    def checkpoint(self) -> Path:
        t, step = self.train_config, self.state.step
        path = checkpoint_dir(self.run_dir) / f"ckpt-{step:07d}.pt"
        save_checkpoint(path, self.model, self.optimizer, self.state, t, self.generators)
        for old in sorted(checkpoint_dir(self.run_dir).glob("ckpt-*.pt"))[:-t.keep_checkpoints]:
            old.unlink()
        return path

    def run(self) -> RunState:
        t, model, state = self.train_config, self.model, self.state
        model.train()
        bar = tqdm(total=t.steps, initial=state.step, disable=not t.progress, unit="step",
                   dynamic_ncols=True)
        images_seen, clock = 0, time.perf_counter()
        while state.step < t.steps:
            index = batch_indices(len(self.train_set), t.batch_size, state.step, t.seed)
            images, labels = self.train_set.get_batch(index)
            images = self.train_set.train_transform(images, self.generators["augment"])
            images = images.to(self.device)
            labels = labels.to(self.device) if labels is not None else None
            bpd, taken = self.training_step(images, labels, learning_rate(t, state.step))
            state.step += 1
            images_seen += images.shape[0]
            if not taken:
                state.nonfinite_steps += 1
                self.log({"step": state.step, "skipped_nonfinite": state.nonfinite_steps})
                if state.nonfinite_steps > t.max_nonfinite:
                    raise FloatingPointError(
                        f"{state.nonfinite_steps} training steps had a non-finite loss or "
                        f"gradient (limit {t.max_nonfinite}); stopping. The last good "
                        f"checkpoint is {latest_checkpoint(self.run_dir)}. Try a lower "
                        "learning rate or a warm-up (--warmup-steps)."
                    )
            if state.step % t.log_every == 0 or state.step == t.steps:
                rate = images_seen / (time.perf_counter() - clock)
                images_seen, clock = 0, time.perf_counter()
                bar.set_postfix(bpd=f"{bpd.item():.3f}", img_s=f"{rate:.1f}")
                self.log({"step": state.step, "train_bpd": bpd.item(), "img_per_s": rate,
                          "lr": learning_rate(t, state.step - 1)})
            last = state.step == t.steps
            if state.step % t.eval_every == 0 or last:
                valid_bpd = self.evaluate()
                self.log({"step": state.step, "valid_bpd": valid_bpd})
                unit = "bits/dim" if model.config.is_image else "nats"
                bar.write(f"step {state.step}: valid {valid_bpd:.4f} {unit}")
                if valid_bpd < state.best_valid_bpd:
                    state.best_valid_bpd = valid_bpd
                    save_checkpoint(checkpoint_dir(self.run_dir) / "best.pt", model,
                                    self.optimizer, state, t, self.generators)
            if (state.step % t.sample_every == 0 or last) and model.config.is_image:
                self.write_samples()  # vector models: see `realnvp toy`
            if state.step % t.checkpoint_every == 0 or last:
                self.checkpoint()
            bar.update(1)
        bar.close()
        if self.writer is not None:
            self.writer.close()
        return state


def train(model_config: RealNVPConfig, train_config: TrainConfig) -> Trainer:
    """Train (or resume, if ``run_dir`` has checkpoints) and return the finished trainer."""
    trainer = Trainer(model_config, train_config)
    trainer.run()
    return trainer
