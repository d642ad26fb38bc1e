"""Sparsifying activations: pure functions from affinities z' [B, F] to sparse activations.

Each one solves the paper's allocation problem (section 3.1) under its own constraint and is
composed with ReLU (appendix H: selecting a non-positive affinity never helps), so every
selected pair has a strictly positive activation and `Sparse.pairs` is exactly the selection.
Gradients flow only into the selected entries: unselected entries are constants (zeros).
"""

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from choicesae.errors import ConfigError, DataError


class Sparse(NamedTuple):
    """Sparse activations of a batch, stored dense as [B, F]."""

    acts: Tensor  # [B, F], zero outside the selection

    @property
    def pairs(self) -> Tensor:  # [n, 2] (token, feature) of every selected match
        return self.acts.nonzero()

    @property
    def l0(self) -> Tensor:  # [B] active features per token
        return (self.acts != 0).sum(-1)


def as_affinities(z_pre: Tensor | np.ndarray) -> Tensor:
    """z' as a tensor: a numpy array (any float dtype) is viewed as one, a tensor kept as it
    is, so that every public sparsifier takes either."""
    z_pre = torch.as_tensor(z_pre)
    if not z_pre.is_floating_point():
        raise DataError(f"affinities must be floats, got {z_pre.dtype}")
    return z_pre


def _scatter_positive(z_pre: Tensor, dim: int, values: Tensor, indices: Tensor) -> Sparse:
    """Place the chosen `values` at `indices` along `dim`, dropping non-positive ones (ReLU)."""
    return Sparse(torch.zeros_like(z_pre).scatter(dim, indices, values.relu()))


def topk(z_pre: Tensor, k: int) -> Sparse:
    """Token Choice: each token (row) keeps its k largest positive affinities."""
    z_pre = as_affinities(z_pre)
    values, indices = z_pre.topk(k, dim=-1, sorted=False)  # [B, k]
    return _scatter_positive(z_pre, -1, values, indices)


def mutual_choice(z_pre: Tensor, k: int) -> Sparse:
    """Mutual Choice (= BatchTopK): the k·B largest positive affinities anywhere in the batch."""
    z_pre = as_affinities(z_pre)
    flat = z_pre.flatten()
    values, indices = flat.topk(min(k * z_pre.shape[0], flat.numel()), sorted=False)
    return Sparse(_scatter_positive(flat, 0, values, indices).acts.view_as(z_pre))


def feature_choice(z_pre: Tensor, m: Tensor) -> Sparse:
    """Feature Choice: feature i (column) keeps its m[i] largest positive affinities.

    One top-(max m) over the token dimension, then each column is cut to its own capacity.
    """
    z_pre, m = as_affinities(z_pre), torch.as_tensor(m)
    B, F = z_pre.shape
    if m.shape != (F,):
        raise ConfigError(f"feature_choice capacities m must have shape [{F}], not {list(m.shape)}")
    m_max = int(m.max())
    if m_max > B:
        raise ConfigError(f"feature_choice capacity {m_max} exceeds the batch size {B}")
    values, indices = z_pre.topk(m_max, dim=0)  # [m_max, F], sorted: row r is each column's r-th
    rank = torch.arange(m_max, device=z_pre.device)[:, None]
    values = values.masked_fill(rank >= m.to(z_pre.device)[None, :], 0.0)
    return _scatter_positive(z_pre, 0, values, indices)


def relu(z_pre: Tensor) -> Sparse:
    """Standard SAE: every positive affinity (sparsity comes from the L1 penalty)."""
    return Sparse(as_affinities(z_pre).relu())


def jumprelu(z_pre: Tensor, theta: Tensor | float) -> Sparse:
    """JumpReLU for inference: z' where z' > θ (and > 0), θ a scalar or one per feature [F]."""
    z_pre = as_affinities(z_pre)
    theta = torch.as_tensor(theta, dtype=z_pre.dtype, device=z_pre.device)
    keep = z_pre > theta.clamp(min=0.0)
    return Sparse(z_pre * keep)


def uniform_capacities(k: int, batch_size: int, num_latents: int) -> Tensor:
    """Uniform Feature Choice (section 4.3): m_i = ⌊M / F⌋ with M = k·B, so L0 ≤ k on average.

    Flooring keeps the budget an upper bound, as Algorithm 1 does for Zipf capacities.
    """
    m = (k * batch_size) // num_latents
    if m < 1:
        raise ConfigError(
            f"feature_choice needs k * batch_size >= num_latents so that every feature can pick "
            f"a token (paper footnote 8); got k={k}, batch_size={batch_size}, "
            f"num_latents={num_latents}: raise the batch size or k"
        )
    return torch.full((num_latents,), m, dtype=torch.long)


Rule = Callable[[Tensor, int, Tensor | None], Sparse]  # (z' [B, F], k, m [F]) -> codes


class Sparsifier(NamedTuple):
    """A trainable sparsifier: its reference function, the one place its rule is written (the
    sparse kernels' index form and the parallel backends' global forms are tested against
    it), and the losses it trains with."""

    reference: Rule  # (z' [B, F], k, m [F]) -> codes
    capacities: bool = False  # it reads Feature Choice capacities m [F] (SAE.capacities)
    aux: bool = True  # aux_k and aux_zipf may revive its dead and dying latents
    aux_zipf: bool = False  # aux_zipf is on by default (--aux-zipf-coeff left at -1)
    l1: bool = False  # it is sparse through the L1 penalty alone
    # it selects within the batch, so a token's code depends on the others: inference encodes
    # each token alone by JumpReLU at thresholds that imitate it (appendix B; SAE.select)
    batch: bool = False


SPARSIFIERS = {  # the registry: the config's choices are its names
    # the paper's TopK baseline trains with aux_k only (Gao et al.); aux_zipf is its option
    "topk": Sparsifier(lambda z_pre, k, m: topk(z_pre, k)),
    # section 4.2: aux_zipf, proposed with Mutual Choice
    "mutual_choice": Sparsifier(
        lambda z_pre, k, m: mutual_choice(z_pre, k), aux_zipf=True, batch=True
    ),
    # section 4.4: Feature Choice trains without the auxiliary losses
    "feature_choice": Sparsifier(
        lambda z_pre, k, m: feature_choice(z_pre, m), True, aux=False, batch=True
    ),
    "relu": Sparsifier(lambda z_pre, k, m: relu(z_pre), aux=False, l1=True),
}
TRAINABLE = tuple(SPARSIFIERS)
# an SAE's choices: jumprelu (a threshold per feature, no batch) is read from a SAELens file
# and run, never trained
CHOICES = (*TRAINABLE, "jumprelu")


def within_layers(rule: Rule, layers: int) -> Rule:
    """`rule` applied to each layer's block of a cross-layer transcoder's affinities z'
    [B, L·F] (L = `layers` blocks [B, F]) with budget k / L: per-layer TopK and Mutual Choice;
    capacities m [L·F] are cut the same way."""

    def within(z_pre: Tensor, k: int, m: Tensor | None) -> Sparse:
        blocks = z_pre.chunk(layers, dim=1)
        ms = [None] * layers if m is None else m.chunk(layers)
        codes = [rule(z, k // layers, c).acts for z, c in zip(blocks, ms, strict=True)]
        return Sparse(torch.cat(codes, 1))

    return within


def sparsify(
    name: str, z_pre: Tensor, *, k: int, m: Tensor | None = None, theta: Tensor | float = 0.0
) -> Sparse:
    """Apply the sparsifier `name` with the parameter it needs (k, capacities m, or θ for the
    inference-only jumprelu); Feature Choice without m takes uniform capacities."""
    if name == "jumprelu":
        return jumprelu(z_pre, theta)
    if name not in SPARSIFIERS:
        raise ConfigError(f"unknown sparsifier {name!r}; choose one of {', '.join(CHOICES)}")
    if name == "feature_choice" and m is None:
        m = uniform_capacities(k, *z_pre.shape)
    return SPARSIFIERS[name].reference(z_pre, k, m)
