"""Synthetic activations with a known dictionary: sparse non-negative combinations of unit-norm
directions whose firing frequencies follow a Zipf law, so the number of active features per
token varies (paper section 3.2), plus a share of constant "first-token" vectors that one extra
direction explains (the BOS/CLS token of appendix D), plus noise. With the true dictionary known,
a learned decoder is scored by MMCS and by the share of true features it recovers."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from choicesae.errors import ConfigError

DATA_STREAM = 0x5E1EC7ED_0000  # offset of the generator's seeds from training seeds


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
    magnitude_min: float = 0.5
    """Smallest coefficient of an active feature (coefficients are uniform in [min, max))."""
    magnitude_max: float = 1.5
    """Largest coefficient of an active feature."""
    first_token_share: float = 1 / 64
    """Share of vectors that are the constant first-token direction (the last dictionary row)
    alone, like the first token of each 64-token context; 0 disables."""
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
        if not 0 <= self.magnitude_min <= self.magnitude_max:
            raise ConfigError("magnitudes need 0 <= magnitude_min <= magnitude_max")
        if not 0 <= self.first_token_share < 1:
            raise ConfigError(f"first_token_share must lie in [0, 1), got {self.first_token_share}")


def feature_probabilities(cfg: SyntheticConfig) -> Tensor:
    """[num_features] firing probability of each true feature (Zipf by rank, capped at 1)."""
    rank = torch.arange(1, cfg.num_features + 1, dtype=torch.float64)
    weights = 1.0 / (rank + cfg.zipf_beta) ** cfg.zipf_alpha
    return (weights * cfg.mean_active / weights.sum()).clamp(max=1.0).float()


def sparse_dictionary(cfg: SyntheticConfig, chunk: int = 16_384) -> tuple[Tensor, Tensor]:
    """(activations [tokens, d_in], dictionary [num_features + 1, d_in]) in memory; the last
    dictionary row is the first-token direction."""
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
    """Fill x [tokens, d_in] chunk by chunk; returns the dictionary [num_features + 1, d_in]."""
    # a stream of its own: seeded with cfg.seed alone, the dictionary would be the very
    # numbers an SAE built after torch.manual_seed(cfg.seed) draws for W_dec, so a training
    # seed equal to the data seed would start at the true dictionary
    gen = torch.Generator().manual_seed(DATA_STREAM + cfg.seed)
    dictionary = torch.randn(cfg.num_features + 1, cfg.d_in, generator=gen)
    dictionary /= dictionary.norm(dim=-1, keepdim=True)
    p = feature_probabilities(cfg)
    span = cfg.magnitude_max - cfg.magnitude_min
    for start in range(0, cfg.tokens, chunk):
        n = min(chunk, cfg.tokens - start)
        active = (torch.rand(n, cfg.num_features, generator=gen) < p).nonzero().T  # [2, nnz]
        magnitude = cfg.magnitude_min + span * torch.rand(active.shape[1], generator=gen)
        codes = torch.sparse_coo_tensor(
            active, magnitude, (n, cfg.num_features), check_invariants=True, is_coalesced=True
        )
        noise = torch.randn(n, cfg.d_in, generator=gen) * (cfg.noise / cfg.d_in**0.5)
        first = torch.rand(n, 1, generator=gen) < cfg.first_token_share  # [n, 1]
        mixed = torch.sparse.mm(codes, dictionary[:-1])
        x[start : start + n] = torch.where(first, dictionary[-1], mixed) + noise
    return dictionary


def max_cosines(true_dictionary: Tensor, W_dec: Tensor, chunk: int = 4096) -> Tensor:
    """[n_true] each true direction's largest cosine similarity to a learned decoder row."""
    learned = W_dec / W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    true = true_dictionary / true_dictionary.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.cat([(rows @ learned.T).max(-1).values for rows in true.split(chunk)])


def mmcs(true_dictionary: Tensor, W_dec: Tensor) -> float:
    """Mean max cosine similarity between the true dictionary and the learned decoder."""
    return float(max_cosines(true_dictionary, W_dec).mean())


def recovered(true_dictionary: Tensor, W_dec: Tensor, threshold: float = 0.9) -> float:
    """Share of true features with a learned decoder row at cosine >= threshold."""
    return float((max_cosines(true_dictionary, W_dec) >= threshold).float().mean())
