"""Real NVP (Dinh, Sohl-Dickstein and Bengio, ICLR 2017) in PyTorch."""

from .bijection import Bijection, Sequential
from .checkpoint import CheckpointError
from .coupling import AffineCoupling
from .masks import channel_mask, checkerboard_mask
from .model import PRESETS, RealNVP, RealNVPConfig, preset_config, standard_normal_log_prob
from .multiscale import Squeeze, flatten_latents, latent_shapes, unflatten_latents
from .networks import MLP, ResNet, WeightNormConv2d
from .normalization import BatchNormFlow
from .preprocessing import LogitTransform, bits_per_dim, dequantize

__all__ = [
    "PRESETS", "AffineCoupling", "BatchNormFlow", "Bijection", "CheckpointError", "LogitTransform",
    "MLP", "RealNVP", "RealNVPConfig", "ResNet", "Sequential", "Squeeze", "WeightNormConv2d",
    "bits_per_dim", "channel_mask", "checkerboard_mask", "dequantize", "flatten_latents",
    "latent_shapes", "preset_config", "standard_normal_log_prob", "unflatten_latents",
]
