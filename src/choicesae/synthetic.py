"""Synthetic activations with a known dictionary: sparse non-negative combinations of unit-norm
directions whose firing frequencies follow a Zipf law, so the number of active features per
token varies (paper section 3.2). Used for tests and for the demo until a model is harvested."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from choicesae.errors import ConfigError


@dataclass(frozen=True)
class SyntheticConfig:
    """A synthetic sparse-dictionary dataset."""

    out: str = "data/synthetic.npy"
    """Where to write the activations (.npy); the true dictionary goes beside it as
    <name>.dictionary.npy."""
    tokens: int = 262_144
    """Number of activation vectors."""
    d_in: int = 384
    """Width of each vector (384 = the embedded all-MiniLM-L6-v2's residual stream)."""
    num_features: int = 3072
    """Size of the true dictionary."""
    mean_active: float = 16.0
    """Expected active true features per vector."""
    zipf_alpha: float = 1.0
    """Zipf exponent of the feature frequencies: p_i ∝ 1 / (i + beta)^alpha."""
    zipf_beta: float = 10.0
    """Zipf offset of the feature frequencies."""
    noise: float = 0.01
    """Expected L2 norm of the dense Gaussian noise added to each vector."""
    seed: int = 0
    """Random seed; the same seed gives the same data."""

    def __post_init__(self):
        for name in ("tokens", "d_in", "num_features"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.mean_active <= self.num_features:
            raise ConfigError(f"mean_active must lie in (0, num_features], got {self.mean_active}")
        if self.noise < 0:
            raise ConfigError(f"noise must not be negative, got {self.noise}")


def feature_probabilities(cfg: SyntheticConfig) -> Tensor:
    """[num_features] firing probability of each true feature (Zipf by rank, capped at 1)."""
    rank = torch.arange(1, cfg.num_features + 1, dtype=torch.float64)
    weights = 1.0 / (rank + cfg.zipf_beta) ** cfg.zipf_alpha
    return (weights * cfg.mean_active / weights.sum()).clamp(max=1.0).float()


def sparse_dictionary(cfg: SyntheticConfig, chunk: int = 16_384) -> tuple[Tensor, Tensor]:
    """(activations [tokens, d_in], dictionary [num_features, d_in]) in memory."""
    x = torch.empty(cfg.tokens, cfg.d_in)
    dictionary = _fill(cfg, x, chunk)
    return x, dictionary


def write_synthetic(cfg: SyntheticConfig) -> tuple[Path, Path]:
    """Write the activations and the dictionary as .npy files; returns their paths."""
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    x = np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=(cfg.tokens, cfg.d_in))
    dictionary = _fill(cfg, torch.from_numpy(x), 16_384)
    x.flush()
    dict_path = out.with_suffix(".dictionary.npy")
    np.save(dict_path, dictionary.numpy())
    return out, dict_path


def _fill(cfg: SyntheticConfig, x: Tensor, chunk: int) -> Tensor:
    """Fill x [tokens, d_in] chunk by chunk; returns the dictionary."""
    gen = torch.Generator().manual_seed(cfg.seed)
    dictionary = torch.randn(cfg.num_features, cfg.d_in, generator=gen)
    dictionary /= dictionary.norm(dim=-1, keepdim=True)
    p = feature_probabilities(cfg)
    for start in range(0, cfg.tokens, chunk):
        n = min(chunk, cfg.tokens - start)
        active = (torch.rand(n, cfg.num_features, generator=gen) < p).nonzero().T  # [2, nnz]
        magnitude = 0.5 + torch.rand(active.shape[1], generator=gen)  # in [0.5, 1.5)
        codes = torch.sparse_coo_tensor(
            active, magnitude, (n, cfg.num_features), check_invariants=True, is_coalesced=True
        )
        noise = torch.randn(n, cfg.d_in, generator=gen) * (cfg.noise / cfg.d_in**0.5)
        x[start : start + n] = torch.sparse.mm(codes, dictionary) + noise
    return dictionary
