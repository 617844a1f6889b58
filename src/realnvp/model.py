"""The Real NVP model: preprocessing, the multi-scale stack of couplings, and the prior.

Images (``input_shape = (C, H, W)``), paper section 3.6 — each scale but the last is

    3 checkerboard couplings (alternating) → squeeze → 3 channel-wise couplings (alternating)
    → factor out half of the channels as z_i → next scale,

and the last scale is 4 checkerboard couplings whose output is z_L. Every coupling is followed
by batch normalisation (section 3.7). The s/t ResNets have ``features · 2^i`` channels at scale i
in checkerboard couplings and twice that in channel-wise ones (the official code).

Vectors (``input_shape = (D,)``): ``coupling_layers`` couplings with alternating halves and MLP
s/t networks, each followed by batch normalisation; one latent.

Density (eq. 3): log p(x̃) = log N(f(x̃); 0, I) + log|det ∂f/∂x̃|, the logit preprocessing of
images included, in nats.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import os
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from .bijection import Bijection, Sequential
from .checkpoint import CheckpointError, atomic_save, load_state, safe_load
from .coupling import AffineCoupling
from .memory import MEMORY_MODES, MemoryMode, flow_forward
from .multiscale import Squeeze, factor_out, latent_shapes
from .networks import MLP, ResNet, WeightNormConv2d
from .normalization import BatchNormFlow
from .preprocessing import LogitTransform, bits_per_dim, dequantize

MODEL_FORMAT = "realnvp-model"
# Precisions of the s/t networks (RealNVP.set_precision): None = the parameters' dtype.
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}
MEMORY_FORMATS = ("channels_last", "contiguous")

# Training checkpoints (realnvp.train) hold the same "config" and "state_dict" entries.
MODEL_FILE_FORMATS = (MODEL_FORMAT, "realnvp-checkpoint")


def has_fast_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bfloat16 natively (a CUDA GPU with bf16, or a CPU with
    AVX-512 BF16 or AMX): where it does not, bf16 is emulated and slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":  # private helpers of torch.cpu: absent means "not known"
        return any(getattr(torch.cpu, name, lambda: False)()
                   for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False


def inference_precision(device: torch.device | str) -> str:
    """The default precision of evaluation and sampling: ``"bf16"`` where the hardware has it
    (it changes bits/dim by about 1e-4, tests/test_precision.py; evaluation about 1.8× faster
    on an AVX-512 BF16 CPU and 4.4× on one with AMX, docs/benchmarks.md), else ``"fp32"``."""
    return "bf16" if has_fast_bf16(device) else "fp32"


@dataclass
class RealNVPConfig:
    """Everything that defines a model's architecture (and nothing about training).

    input_shape:      (C, H, W) for images (pixels in [0, 1)), or (D,) for real vectors.
    scales:           image models: number of scales L (every scale but the last squeezes once).
    res_blocks:       residual blocks per s/t ResNet; for vector models, hidden layers per MLP.
    features:         ResNet channels at the first scale (doubling at every scale), or MLP width.
    coupling_layers:  vector models only: number of coupling layers.
    num_classes:      None (unconditional), the number of classes, or of binary attributes.
    label_kind:       "class" (labels are int indices) or "attributes" (float {0,1} vectors).
    shift_then_scale: the official code's coupling y = (x + t)·exp(s) instead of x·exp(s) + t.
    batch_norm:       "batch" (batch statistics in training), "lagged" (appendix E) or "none".
    bn_entries:       which entries each batch norm normalises: "all" of the coupling's output
                      (the paper's text), "transformed" only those the coupling before it
                      transformed, with their own statistics (SPEC §1.5), or "official" the
                      same entries with the official code's statistics (of (1 − b) ⊙ y, the
                      passed entries counting as zeros).
    bn_momentum:      weight of the batch in the running averages (official decay 0.9 → 0.1).
    bn_eps:           ε of the flow's batch normalisation.
    logit_alpha:      α of the logit preprocessing.
    logit_form:       "paper" (p = α + (1−α)x̃) or "official" (p = α + (1−2α)x̃).
    """

    input_shape: tuple[int, ...] = (3, 32, 32)
    scales: int = 2
    res_blocks: int = 8
    features: int = 64
    coupling_layers: int = 8
    num_classes: int | None = None
    label_kind: Literal["class", "attributes"] = "class"
    shift_then_scale: bool = False
    batch_norm: Literal["batch", "lagged", "none"] = "batch"
    bn_entries: Literal["all", "transformed", "official"] = "all"
    bn_momentum: float = 0.1
    bn_eps: float = 1e-4
    logit_alpha: float = 0.05
    logit_form: Literal["paper", "official"] = "paper"

    def __post_init__(self) -> None:
        check_field_types(self)
        self.input_shape = tuple(int(s) for s in self.input_shape)
        if len(self.input_shape) not in (1, 3) or min(self.input_shape) < 1:
            raise ValueError(f"input_shape must be (C, H, W) or (D,), got {self.input_shape}")
        for name in ("scales", "res_blocks", "features", "coupling_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be None or positive, got {self.num_classes}")
        if self.label_kind not in ("class", "attributes"):
            raise ValueError(f"label_kind must be 'class' or 'attributes', got {self.label_kind!r}")
        if self.batch_norm not in ("batch", "lagged", "none"):
            raise ValueError(f"batch_norm must be batch, lagged or none, got {self.batch_norm!r}")
        if self.bn_entries not in ("all", "transformed", "official"):
            raise ValueError(f"bn_entries must be all, transformed or official, got "
                             f"{self.bn_entries!r}")
        if not (0 < self.bn_momentum <= 1 and 0 < self.bn_eps < math.inf):
            raise ValueError(f"need 0 < bn_momentum <= 1 and bn_eps > 0, got bn_momentum="
                             f"{self.bn_momentum}, bn_eps={self.bn_eps}")
        if not 0 < self.logit_alpha < 0.5 or self.logit_form not in ("paper", "official"):
            raise ValueError(f"need 0 < logit_alpha < 0.5 and logit_form 'paper' or 'official', "
                             f"got {self.logit_alpha}, {self.logit_form!r}")
        if self.is_image:
            latent_shapes(self.input_shape, self.scales)  # raises if a squeeze meets an odd size
        elif self.input_shape[0] < 2:
            raise ValueError("a vector model needs at least 2 dimensions to couple")

    @property
    def is_image(self) -> bool:
        return len(self.input_shape) == 3

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RealNVPConfig:
        return dataclass_from_dict(cls, d)


def _entry(payload: dict, key: str, path: str | Path) -> Any:
    if key not in payload:
        raise CheckpointError(f"{path}: incomplete file, no {key!r} entry")
    return payload[key]


def config_from_payload(payload: dict, path: str | Path) -> RealNVPConfig:
    """The model config a model file or checkpoint recorded, as a CheckpointError naming the
    file if it is missing or invalid."""
    try:
        return RealNVPConfig.from_dict(_entry(payload, "config", path))
    except (TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(f"{path}: its model config is not valid ({error})") from error


def check_field_types(config: Any) -> None:
    """Check every field of a config dataclass against its annotated type, and store it as a
    plain Python value: a TOML file or a caller can give "0.1" or 2.0 where a number or an
    integer belongs, which would otherwise fail later with a bare TypeError, or not at all.
    Integers pass for floats and paths for strings; numpy and 0-d torch scalars pass as the
    Python number they hold (and are stored as one: checkpoints load with
    ``weights_only=True``, which refuses numpy objects); lists, arrays and 1-D tensors pass
    for tuples; booleans do not pass for numbers.
    Literal fields are left to the config's own checks (they name the choices). Raises a
    ValueError naming the first field that does not fit."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, hint = getattr(config, f.name), hints[f.name]
        fits, plain = _as_type(value, hint)
        if not fits:
            raise ValueError(f"{f.name} must be {_type_words(hint)}, got {value!r} "
                             f"({type(value).__module__}.{type(value).__qualname__})"
                             .replace("(builtins.", "("))
        setattr(config, f.name, plain)


def _as_type(value: Any, hint: Any) -> tuple[bool, Any]:
    """(whether ``value`` fits ``hint``, the value as a plain Python object)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            fits, plain = _as_type(value, arg)
            if fits:
                return True, plain
        return False, value
    if origin is Literal:
        return True, value
    if isinstance(value, (np.ndarray, torch.Tensor)):
        if value.ndim == 0:
            value = value.item()
        elif origin is tuple and value.ndim == 1:
            value = value.tolist()
    elif isinstance(value, np.generic):  # np.int64, np.float32, np.bool_, ...
        value = value.item()
    elif hint is str and isinstance(value, os.PathLike):  # a pathlib.Path: kept as text (TOML)
        value = os.fspath(value)
    if origin is tuple:  # tuple[int, ...]
        if not isinstance(value, (tuple, list)):
            return False, value
        items = [_as_type(v, args[0]) for v in value]
        return all(fits for fits, _ in items), tuple(v for _, v in items)
    if hint is type(None):
        return value is None, value
    if hint in (int, float):
        kind = numbers.Integral if hint is int else numbers.Real
        fits = isinstance(value, kind) and not isinstance(value, bool)
        return fits, (hint(value) if fits else value)
    return isinstance(value, hint), value


def _type_words(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_words(a) for a in args)
    if origin is tuple:
        return f"a list of {_type_words(args[0]).split(' ', 1)[1]}s"  # "an integer" → integers
    words = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
             type(None): "None"}
    return words.get(hint, str(hint))


def dataclass_from_dict(cls: type, d: dict[str, Any]) -> Any:
    """``cls(**d)`` for a config dataclass, naming any key that is not one of its fields."""
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {', '.join(unknown)}")
    return cls(**d)


# The paper's architectures (SPEC section 3). MNIST: 28 → 14 → 7, and 7 cannot be squeezed, so
# three scales, the last one working at 7×7 (instead of the paper's 4×4).
PRESETS: dict[str, dict[str, Any]] = {
    "cifar10": dict(input_shape=(3, 32, 32), scales=2, res_blocks=8, features=64),
    "imagenet32": dict(input_shape=(3, 32, 32), scales=4, res_blocks=4, features=32),
    "imagenet64": dict(input_shape=(3, 64, 64), scales=5, res_blocks=2, features=32),
    "celeba64": dict(input_shape=(3, 64, 64), scales=5, res_blocks=2, features=32),
    "lsun64": dict(input_shape=(3, 64, 64), scales=5, res_blocks=2, features=32),
    "mnist": dict(input_shape=(1, 28, 28), scales=3, res_blocks=4, features=32),
    # 2-D toy densities (the paper's Figure 1): MLP couplings of width 64 with 2 hidden layers.
    "toy2d": dict(input_shape=(2,), coupling_layers=8, res_blocks=2, features=64),
}


def preset_config(name: str, **overrides: Any) -> RealNVPConfig:
    """The config of a preset, with config fields overridden by keyword."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return dataclass_from_dict(RealNVPConfig, {**PRESETS[name], **overrides})


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """``module`` and all its submodules in eval mode inside the block; afterwards each one is
    back in its own mode (a batch norm frozen with ``.eval()`` stays frozen). Encoding,
    decoding and sampling always run in it: the eval-mode bijection (running batch-norm
    statistics), whatever mode the module is in."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


class RealNVP(nn.Module):
    """Real NVP density model for images or vectors; see the module docstring."""

    def __init__(self, config: RealNVPConfig) -> None:
        super().__init__()
        self.config = config
        cond = config.num_classes or 0
        if config.is_image:
            self.preprocess: Bijection | None = LogitTransform(
                config.logit_alpha, config.logit_form
            )
            self.scales = nn.ModuleList(self._image_scales(config, cond))
        else:
            self.preprocess = None
            self.scales = nn.ModuleList([self._vector_flow(config, cond)])
        # Run-time options, not architecture: see set_precision, set_memory_mode and
        # set_memory_format.
        self.precision = "fp32"
        self.set_memory_mode("none")
        self.set_memory_format("channels_last")

    # -- construction ---------------------------------------------------------------------

    def _coupling(self, net: nn.Module, mask: str, parity: int, channels: int) -> list[Bijection]:
        c = self.config
        layers: list[Bijection] = [
            AffineCoupling(net, mask, parity, shift_then_scale=c.shift_then_scale)  # type: ignore[arg-type]
        ]
        if c.batch_norm != "none":
            masked = c.bn_entries != "all"  # SPEC §1.5: only what the coupling transformed
            layers.append(BatchNormFlow(
                channels, momentum=c.bn_momentum, eps=c.bn_eps, mode=c.batch_norm,
                mask=mask if masked else None, parity=parity,  # type: ignore[arg-type]
                zeros_in_stats=c.bn_entries == "official" and mask == "checkerboard",
            ))
        return layers

    def _image_scales(self, c: RealNVPConfig, cond: int) -> Iterator[Sequential]:
        channels = c.input_shape[0]
        for scale in range(c.scales):
            width = c.features * 2**scale
            last = scale == c.scales - 1
            layers: list[Bijection] = []
            for k in range(4 if last else 3):
                net = ResNet(channels, 2 * channels, width, c.res_blocks,
                             extra_channels=1, cond_features=cond)
                layers += self._coupling(net, "checkerboard", (k + 1) % 2, channels)
            if not last:
                layers.append(Squeeze())
                channels *= 4
                for k in range(3):
                    half = channels // 2
                    net = ResNet(half, 2 * half, 2 * width, c.res_blocks, cond_features=cond)
                    layers += self._coupling(net, "channel", k % 2, channels)
                channels //= 2  # factor out half
            yield Sequential(*layers)

    def _vector_flow(self, c: RealNVPConfig, cond: int) -> Sequential:
        d = c.input_shape[0]
        layers: list[Bijection] = []
        for k in range(c.coupling_layers):
            passed = (d + 1) // 2 if k % 2 == 0 else d // 2
            net = MLP(passed, 2 * (d - passed), c.features, c.res_blocks, cond_features=cond)
            layers += self._coupling(net, "channel", k % 2, d)
        return Sequential(*layers)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> RealNVP:
        """A model of one of :data:`PRESETS` (cifar10, imagenet32, imagenet64, celeba64, lsun64,
        mnist), with config fields overridden by keyword, e.g. ``res_blocks=4``."""
        return cls(preset_config(name, **overrides))

    # -- input checks -----------------------------------------------------------------------

    def _check_input(self, x: Tensor, what: str, any_size: bool = False) -> None:
        shape = self.config.input_shape
        if not isinstance(x, Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != len(shape) + 1:
            layout = f"(N, C, H, W) with (C, H, W) = {shape}" if self.config.is_image else \
                f"(N, D) with D = {shape[0]}"
            raise ValueError(f"{what} must have shape {layout}, got shape {tuple(x.shape)}")
        if x.shape[1] != shape[0]:
            raise ValueError(f"{what} has {x.shape[1]} channels, the model expects {shape[0]}")
        if self.config.is_image and not any_size and tuple(x.shape[2:]) != shape[1:]:
            raise ValueError(f"{what} has size {tuple(x.shape[2:])}, the model was built for "
                             f"{shape[1:]}")
        if x.shape[0] == 0:
            raise ValueError(f"{what} is an empty batch")
        if x.is_floating_point() and torch.isnan(x).any():
            raise ValueError(f"{what} contains NaN")

    def _check_pixels(self, x: Tensor, any_size: bool = False) -> None:
        self._check_input(x, "x", any_size)
        if not self.config.is_image:
            if not x.is_floating_point():
                raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
            if torch.isinf(x).any():
                raise ValueError("x contains infinite values")
            self._check_dtype(x, "the vectors")
            return
        if not x.is_floating_point():
            raise TypeError(f"x must hold dequantised pixels as floats in [0, 1), got {x.dtype}; "
                            "for integer pixels use bits_per_dim(x) or realnvp.dequantize(x)")
        self._check_dtype(x, "the pixels")
        lo, hi = float(x.detach().min()), float(x.detach().max())
        top_ok = hi < 1 if self.config.logit_form == "paper" else hi <= 1
        if lo < 0 or not top_ok:
            raise ValueError(f"pixel values must lie in [0, 1) (dequantised (x + u) / 2^n), got "
                             f"values in [{lo:.4g}, {hi:.4g}]")

    def encode_condition(
        self, cond: Tensor | None, batch: int, check: bool = True
    ) -> Tensor | None:
        """Labels → the (N, K) float vector the s/t networks see: one-hot classes, or binary
        attributes mapped to ±1. Checks presence and shape, and with ``check`` the values
        (which reads them back from the device: a host sync)."""
        k = self.config.num_classes
        if k is None:
            if cond is not None:
                raise ValueError("this model is unconditional (num_classes=None): cond must be "
                                 "None")
            return None
        if cond is None:
            raise ValueError(f"this model is conditional on {k} {self.config.label_kind}: pass "
                             "cond")
        if self.config.label_kind == "class":
            if (cond.dim() != 1 or cond.shape[0] != batch or cond.is_floating_point()
                    or cond.dtype == torch.bool):
                raise ValueError(f"cond must be an integer tensor of shape ({batch},) of class "
                                 f"indices, got {cond.dtype} of shape {tuple(cond.shape)}")
            if check and (cond.min() < 0 or cond.max() >= k):
                raise ValueError(f"class labels must be in [0, {k - 1}], got "
                                 f"[{int(cond.min())}, {int(cond.max())}]")
            # one-hot by comparison: F.one_hot checks the range itself, a host sync on GPUs
            classes = torch.arange(k, device=cond.device)
            return (cond[:, None] == classes).to(self._dtype())
        if cond.shape != (batch, k):
            raise ValueError(f"cond must be a ({batch}, {k}) attribute tensor, got "
                             f"{tuple(cond.shape)}")
        if check and not ((cond == 0) | (cond == 1)).all():
            raise ValueError("attribute labels must be 0 or 1")
        return cond.to(self._dtype()) * 2 - 1

    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _check_dtype(self, x: Tensor, what: str) -> None:
        if x.is_floating_point() and x.dtype != self._dtype():
            raise TypeError(f"{what} are {x.dtype}, the model's weights {self._dtype()}: convert "
                            f"one to the other (x.to(...) or model.to(...))")

    # -- the bijection x̃ → [z_1, …, z_L] ------------------------------------------------

    def _forward(
        self, x: Tensor, cond: Tensor | None, check: bool = True
    ) -> tuple[list[Tensor], Tensor]:
        c = self.encode_condition(cond, x.shape[0], check)
        logdet = x.new_zeros(x.shape[0])
        h = x
        if self.preprocess is not None:
            h, logdet = self.preprocess(h)
        latents = []
        for i, scale in enumerate(self.scales):
            h, scale_logdet = flow_forward(scale, h, c, self.memory_mode)
            logdet = logdet + scale_logdet
            if i < len(self.scales) - 1:
                h, z = factor_out(h)
                latents.append(z)
        latents.append(h)
        return latents, logdet

    def _inverse(self, latents: list[Tensor], cond: Tensor | None) -> Tensor:
        c = self.encode_condition(cond, latents[0].shape[0])
        h = latents[-1]
        for i in reversed(range(len(self.scales))):
            if i < len(self.scales) - 1:
                h = torch.cat([h, latents[i]], dim=1)
            h, _ = self.scales[i].inverse(h, c)
        if self.preprocess is not None:
            h, _ = self.preprocess.inverse(h)
        return h

    # -- run-time options (not part of the config, not saved) ------------------------------

    def set_precision(self, precision: str) -> RealNVP:
        """Arithmetic of the s/t networks: ``"fp32"`` (the parameters' own dtype, the default)
        or ``"bf16"`` (the networks run under ``torch.autocast`` with bfloat16 on the model's
        device type). Only the networks change: their outputs are cast back before
        s = scale·tanh(raw_s) and t are used, so log-determinants, the prior and the
        preprocessing stay in full precision. Applies to training, evaluation and sampling.
        bf16 changes bits/dim by about 1e-4 (tests/test_precision.py) but makes decode(encode(x))
        less exact: on the ``cifar10`` architecture (perturbed weights, 64 CIFAR-10 images) up
        to 1.5e-3 in units of x ∈ [0, 1) (0.38 of a pixel level), against 4e-7 in fp32. (The
        inverse recomputes s and t from the passed-through values, so where those come back
        equal to bf16's precision the round trip is as exact as in fp32.) Returns the model.
        """
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got "
                             f"{precision!r}")
        if precision == "bf16" and self._dtype() != torch.float32:
            raise ValueError(f"bf16 autocast works on float32 weights; this model's are "
                             f"{self._dtype()} (autocast leaves them alone)")
        for module in self.modules():
            if isinstance(module, AffineCoupling):
                module.st_autocast = PRECISIONS[precision]
        self.precision = precision
        return self

    def set_memory_mode(
        self, mode: MemoryMode, *, recompute_activations: bool | None = None
    ) -> RealNVP:
        """How backpropagation through the flow stores activations (see :mod:`realnvp.memory`):
        ``"none"`` (store everything, the fastest), ``"invertible"`` (rebuild each layer's input
        from its output with the inverse; memory independent of depth) or ``"checkpoint"``
        (recompute every coupling's s/t network from its stored input).

        ``recompute_activations``: the convolutional s/t networks recompute each BN → ReLU in
        the backward pass rather than store its output (:func:`realnvp.networks.norm_relu_conv`):
        for the ``cifar10`` model on a 2-core CPU a quarter to a third less peak memory in
        training, for 0–1 % more time in fp32, 2–6 % in bf16 and 5 % for the small demo model.
        ``None`` (the default): on in the memory-saving modes, off in ``"none"``.

        The gradients are those of ordinary backpropagation up to rounding (bit for bit with
        ``recompute_activations`` alone), and batch-norm running averages move once per step in
        every mode. Evaluation and sampling are unaffected. Returns the model.
        """
        if mode not in MEMORY_MODES:
            raise ValueError(f"memory mode must be one of {', '.join(MEMORY_MODES)}, got "
                             f"{mode!r}")
        if recompute_activations is None:
            recompute_activations = mode != "none"
        for module in self.modules():
            if isinstance(module, ResNet):
                module.recompute = recompute_activations
        self.memory_mode: MemoryMode = mode
        self.recompute_activations = recompute_activations
        return self

    def set_memory_format(self, memory_format: str) -> RealNVP:
        """Memory layout inside the convolutional s/t networks: ``"channels_last"`` (NHWC, the
        layout oneDNN's and cuDNN's convolutions run fastest in) or ``"contiguous"`` (NCHW).
        The flow's own tensors, inputs, outputs and latents stay NCHW either way; the results
        are the same up to float rounding. Returns the model.
        """
        if memory_format not in MEMORY_FORMATS:
            raise ValueError(f"memory format must be one of {', '.join(MEMORY_FORMATS)}, got "
                             f"{memory_format!r}")
        for module in self.modules():
            if isinstance(module, ResNet):
                module.channels_last = memory_format == "channels_last"
        self.memory_format = memory_format
        return self

    # -- public API --------------------------------------------------------------------------

    def log_prob(self, x: Tensor, cond: Tensor | None = None, *, check: bool = True) -> Tensor:
        """Log-density in nats, shape (N,).

        Images: x is (N, C, H, W) float dequantised pixels in [0, 1); the density is that of x̃
        on [0, 1]^D, the logit Jacobian included. Vectors: x is (N, D) real. In train mode the
        flow's batch norm uses batch statistics (the training objective); in eval mode it is the
        model's exact density. ``check=False`` skips input validation, the label value checks
        and the finiteness check, so the call never waits for the device (the training loop
        handles non-finite losses itself).
        """
        if check:
            self._check_pixels(x)
        latents, logdet = self._forward(x, cond, check)
        log_prob = logdet + sum(standard_normal_log_prob(z) for z in latents)
        if check and not torch.isfinite(log_prob).all():
            raise FloatingPointError(
                "log_prob produced a non-finite value: the model's weights or batch-norm "
                "statistics have diverged (or the input lies at the edge of the logit's domain)"
            )
        return log_prob

    def bits_per_dim(
        self,
        x: Tensor,
        cond: Tensor | None = None,
        *,
        n_bits: int = 8,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """Bits/dim of integer images x ∈ {0, …, 2ⁿ − 1}, shape (N,): draws u ~ U[0, 1)^D
        from ``generator`` (or takes ``noise``, x's shape), x̃ = (x + u) / 2ⁿ and returns
        (−log p(x̃) + D·n·ln 2) / (D·ln 2)."""
        if not self.config.is_image:
            raise ValueError("bits_per_dim is for image models; use log_prob for vectors")
        self._check_input(x, "x")
        x_tilde = dequantize(x.to(self._device()), n_bits, generator, noise=noise
                             ).to(self._dtype())
        return bits_per_dim(self.log_prob(x_tilde, cond), x[0].numel(), n_bits)

    def standard_normal(self, shape: tuple[int, ...], generator: torch.Generator | None = None
                        ) -> Tensor:
        """N(0, I) noise of ``shape`` in the model's dtype, on its device, drawn on the
        generator's device (a CPU generator gives the same numbers for a model on a GPU)."""
        device = self._device() if generator is None else generator.device
        return torch.randn(tuple(shape), generator=generator, device=device,
                           dtype=self._dtype()).to(self._device())

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def latent_shapes(self, shape: tuple[int, ...] | None = None) -> list[tuple[int, ...]]:
        """Per-scale latent shapes (without the batch dimension) for inputs of ``shape``
        ((C, H, W) or (H, W); the training shape by default)."""
        c = self.config
        if not c.is_image:
            if shape is not None and tuple(shape) != c.input_shape:
                raise ValueError(f"a vector model's inputs have shape {c.input_shape}; shape= is "
                                 "for image models (another spatial size)")
            return [c.input_shape]
        shape = tuple(shape) if shape is not None else c.input_shape
        if len(shape) == 2:
            shape = (c.input_shape[0], *shape)
        if shape[0] != c.input_shape[0]:
            raise ValueError(f"the model has {c.input_shape[0]} channels, not {shape[0]}")
        return latent_shapes(shape, c.scales)  # type: ignore[arg-type]

    def encode(self, x: Tensor, cond: Tensor | None = None) -> list[Tensor]:
        """x (N, C, H, W) in [0, 1) (or (N, D)) → [z_1, …, z_L], finest scale first (eval mode).
        Inputs of another spatial size are accepted where every squeeze meets an even size."""
        self._check_pixels(x, any_size=True)
        with eval_mode(self):
            return self._forward(x, cond)[0]

    def decode(self, latents: list[Tensor], cond: Tensor | None = None) -> Tensor:
        """Exact inverse of :meth:`encode` (eval mode): [z_1, …, z_L] → x."""
        if not isinstance(latents, (list, tuple)) or len(latents) != len(self.scales):
            raise ValueError(f"decode takes a list of {len(self.scales)} latent tensors, one per "
                             "scale, as returned by encode")
        if not all(isinstance(z, Tensor) for z in latents):
            raise TypeError("decode takes a list of tensors")
        dims = 1 + (3 if self.config.is_image else 1)
        if any(z.dim() != dims for z in latents):
            raise ValueError(f"each latent must have {dims} dimensions (batch first, as encode "
                             f"returns them), got shapes {[tuple(z.shape) for z in latents]}; "
                             "for one flat vector per image use unflatten_latents")
        if len({z.shape[0] for z in latents}) > 1:
            raise ValueError(f"the latents have different batch sizes: "
                             f"{[z.shape[0] for z in latents]}")
        for z in latents:
            if not z.is_floating_point():
                raise TypeError(f"the latents must be floating point, got {z.dtype}")
            self._check_dtype(z, "the latents")
        if self.config.is_image:
            n, c, h, w = latents[0].shape
            expected = self.latent_shapes((h * 2, w * 2) if len(self.scales) > 1 else (h, w))
        else:
            expected = [self.config.input_shape]
        got = [tuple(z.shape[1:]) for z in latents]
        if got != [tuple(s) for s in expected]:
            raise ValueError(f"latent shapes {got} do not fit this model; expected {expected}")
        if not all(torch.isfinite(z).all() for z in latents):
            raise ValueError("the latents contain NaN or infinite values")
        with eval_mode(self):
            return self._inverse(list(latents), cond)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        temperature: float = 1.0,
        cond: Tensor | None = None,
        shape: tuple[int, int] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """n samples x = f⁻¹(z), z ~ N(0, T² I), in eval mode. Images: (n, C, H, W) clamped to
        [0, 1]; ``shape=(H, W)`` samples at another size (the networks are convolutional).
        Vectors: (n, D). ``generator`` may be on the CPU for a model on a GPU: z is drawn on
        the generator's device."""
        if n < 1:
            raise ValueError(f"n must be positive, got {n}")
        if not 0 <= temperature < math.inf:  # NaN too
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
        latents = [temperature * self.standard_normal((n, *s), generator)
                   for s in self.latent_shapes(shape)]
        with eval_mode(self):
            x = self._inverse(latents, cond)
        return x.clamp(0, 1) if self.config.is_image else x

    def l2_parameters(self) -> list[nn.Parameter]:
        """The parameters the paper's recipe L2-penalises: weight-norm magnitudes and the
        couplings' tanh scales."""
        params: list[nn.Parameter] = []
        for module in self.modules():
            if isinstance(module, WeightNormConv2d):
                params.append(module.weight_g)
            elif isinstance(module, AffineCoupling):
                params.append(module.scale)
        return params

    # -- files -------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Weights, batch-norm statistics and config in one file (written atomically)."""
        atomic_save({"format": MODEL_FORMAT, "version": 1, "config": self.config.to_dict(),
                     "state_dict": self.state_dict()}, path)

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> RealNVP:
        """Rebuild a model from a file written by :meth:`save`, a training checkpoint, or a
        training run's folder (its ``checkpoints/best.pt``, else its latest checkpoint). The
        model comes back in eval mode, ready to evaluate with its running batch-norm
        statistics: call ``.train()`` to train it further (in train mode every forward pass
        normalises with the batch's own statistics and moves the running ones)."""
        from .train import resolve_checkpoint  # the run-folder layout is the trainer's

        path = resolve_checkpoint(path)
        payload = safe_load(path, MODEL_FILE_FORMATS, map_location)
        model = cls(config_from_payload(payload, path))
        load_state(model, _entry(payload, "state_dict", path), path)
        return model.eval()

    def load_weights(self, path: str | Path) -> None:
        """Load weights into this model; the file must come from a model of the same config."""
        payload = safe_load(path, MODEL_FILE_FORMATS, self._device())
        mine, theirs = self.config.to_dict(), config_from_payload(payload, path).to_dict()
        differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if differ:
            detail = ", ".join(f"{k}: file {theirs.get(k)!r} vs model {mine.get(k)!r}"
                               for k in differ)
            raise CheckpointError(f"{path}: saved from another config ({detail})")
        load_state(self, _entry(payload, "state_dict", path), path)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I) summed over all but the batch dimension, (N, ...) → (N,)."""
    return -0.5 * (z.reshape(z.shape[0], -1).pow(2) + math.log(2 * math.pi)).sum(dim=1)
