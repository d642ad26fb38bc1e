"""Input preprocessing and its inverse (paper, section 5: centre each token over d_model and
scale it to unit L2 norm), with a dataset-level scale factor as the alternative."""

from typing import NamedTuple

import torch
from torch import Tensor

EPS = 1e-8


class Stats(NamedTuple):
    """What `denormalize` needs to map a reconstruction back to the model's activation space."""

    mean: Tensor  # [B, 1] per-token mean (zeros unless mode is token)
    scale: Tensor  # [B, 1] or scalar: the factor the input was multiplied by


def normalize(x: Tensor, mode: str, dataset_scale: Tensor | float = 1.0) -> tuple[Tensor, Stats]:
    """x [B, d] -> (normalized x [B, d], stats). `dataset_scale` is used by mode 'dataset'."""
    if mode == "token":
        mean = x.mean(-1, keepdim=True)
        centred = x - mean
        scale = 1.0 / centred.norm(dim=-1, keepdim=True).clamp_min(EPS)
        return centred * scale, Stats(mean, scale)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    if mode == "dataset":
        scale = torch.as_tensor(dataset_scale, dtype=x.dtype, device=x.device)
        return x * scale, Stats(zero, scale)
    if mode == "none":
        return x, Stats(zero, torch.ones((), dtype=x.dtype, device=x.device))
    raise ValueError(f"unknown normalize mode {mode!r}")


def denormalize(x_n: Tensor, stats: Stats) -> Tensor:
    """Inverse of `normalize`: [B, d] in normalized space -> [B, d] in the model's space."""
    return x_n / stats.scale + stats.mean


def estimate_dataset_scale(sample: Tensor) -> float:
    """Factor giving the sample unit mean L2 norm (stored with the SAE as `scale`)."""
    return float(1.0 / sample.float().norm(dim=-1).mean().clamp_min(EPS))
