"""How the objective's selections are made and decoded: the two interchangeable op sets.

- `Dense`, the reference: the plain sparsifiers of core/sparsifiers.py on the dense z' [B, F] and
  autograd through them;
- `Sparse`, the fast step: selections in index form (kernels.py), one sparse encoder backward
  for all of them, sparse decodes.

Both work over a parallel backend (parallel/data.py, parallel/features.py), which contributes
only selections over the global batch or all latents (`select`, `select_masked`, None where the
local one is exact), the capacities of the batch it sees, and the identities `replicated` and
`sum_shards` that feature sharding replaces with collectives. `LOCAL` is one process.
"""

from typing import NamedTuple

import torch
from torch import Tensor

from choicesae.core.losses import fvu, l1, masked_topk
from choicesae.core.sparsifiers import SPARSIFIERS
from choicesae.step import kernels
from choicesae.step.kernels import Pairs


class Local:
    """The backend of one process (and of data parallel with --distributed-selection local):
    every selection is the local one, nothing is summed."""

    feature_major = True  # Feature Choice reads z'ᵀ rows (kernels.pre_acts)
    dense_only: tuple[str, ...] = ()  # sparsifiers this backend steps with the Dense ops only

    def capacities(self, sae, batch_size: int, k: int) -> Tensor:
        return sae.capacities(batch_size, k)

    def select(self, name: str, z: Tensor, k: int, m: Tensor | None) -> Pairs | None:
        return None

    def select_masked(self, z: Tensor, mask: Tensor, k: int, rows: slice) -> Pairs | None:
        return None

    def replicated(self, t: Tensor) -> Tensor:
        return t

    def sum_shards(self, t: Tensor) -> Tensor:
        return t

    def reduce(self, sae, result, y: Tensor, fired: Tensor, cfg) -> tuple:
        """Backward, and the batch's totals: (StepOut, fired [F], metrics), the FVU against
        the normalized targets y [B, d_target] (an autoencoder's: its inputs)."""
        result.loss.backward()
        with torch.no_grad():
            metrics = {"fvu": fvu(result.x_hat, y), "l0": fired.sum() / y.shape[0]}
        return result, fired, metrics

    def clip_grad_norm_(self, sae, max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), max_norm)


LOCAL = Local()


class DenseCode(NamedTuple):
    acts: Tensor  # [B, F], or [B', F] for the tokens `rows` alone when `cut`
    cut: bool = False


def dense_acts(z_pre: Tensor, pairs: Pairs) -> Tensor:
    """[B, F] activations, ReLU(z') at the pairs and zero elsewhere, differentiable in z_pre."""
    at = (pairs.token, pairs.feature)
    return torch.zeros_like(z_pre).index_put(at, z_pre[at].relu())


@torch.no_grad()
def batch_codes(sae, x: Tensor) -> Tensor:
    """[B, F] activations of the model's own batch rule on normalized x [B, d_in], selected as
    the sparse step selects (kernels.INDEX, tested against the reference; the reference where
    it declines): what SAE.select(z', batch=True) gives, several times faster on wide batches.
    The JumpReLU thresholds are fitted to it (core/thresholds.py)."""
    name, k = sae.cfg.sparsifier, sae.cfg.k
    major = name in kernels.FEATURE_MAJOR
    z = kernels.pre_acts(sae, x, feature_major=major)  # [B, F]
    m = sae.capacities(len(x), k) if SPARSIFIERS[name].capacities else None
    pairs = kernels.index_form(sae, name)(z, k, m)
    return sae.select(z, batch=True).acts if pairs is None else dense_acts(z, pairs)


class Dense:
    """The reference ops: autograd through the dense activations."""

    def __init__(self, backend=LOCAL):
        self.backend = backend

    @property
    def reference(self) -> "Dense":
        return self

    def affinities(self, sae, x: Tensor, sparsifier: str) -> Tensor:
        return sae.product(self.backend.replicated(sae.centred(x))) + sae.b_enc  # SAE.pre_acts

    def codes(self, sae, x: Tensor, z: Tensor, sparsifier: str, wanted: dict) -> dict:
        return {name: self.code(sae, z, sparsifier, want) for name, want in wanted.items()}

    def code(self, sae, z: Tensor, sparsifier: str, want) -> DenseCode:
        backend = self.backend
        if want.mask is not None:  # an aux loss's latents
            pairs = backend.select_masked(z, want.mask, want.k, want.rows)
            if pairs is None:
                return DenseCode(masked_topk(z[want.rows], want.mask, want.k).acts, cut=True)
            return DenseCode(dense_acts(z, pairs))
        rule = SPARSIFIERS[sparsifier]
        m = backend.capacities(sae, z.shape[0], want.k) if rule.capacities else None
        pairs = backend.select(sparsifier, z.detach(), want.k, m)
        if pairs is None:
            return DenseCode(sae.rule(sparsifier)(z, want.k, m).acts)
        return DenseCode(dense_acts(z, pairs))

    def decode(
        self, sae, code: DenseCode, rows: slice | None = None, below: int | None = None
    ) -> Tensor:
        """acts @ W_dec [B, d] without the bias (at the tokens `rows` when given; with the
        latents of index below `below` alone when given, a Matryoshka prefix)."""
        if code.cut:
            return code.acts @ sae.W_dec
        x_hat = self.backend.sum_shards(code.acts[:, :below] @ sae.W_dec[:below])
        return x_hat if rows is None else x_hat[rows]

    def l1(self, sae, code: DenseCode, batch_size: int) -> Tensor:
        return self.backend.sum_shards(l1(code.acts, sae.W_dec))  # the shards' sums add up

    def acts(self, code: DenseCode) -> Tensor:
        return code.acts


class SparseCode(NamedTuple):
    pairs: Pairs
    acts: Tensor  # [n] activations at the pairs


class Sparse:
    """The fast ops: index selections, one sparse encoder backward, sparse decodes. A batch
    without a sparse form (`kernels.INDEX` declines, or the backend has no sparse form of the
    sparsifier) takes the `reference` ops."""

    def __init__(self, backend=LOCAL):
        self.backend = backend
        self.reference = Dense(backend)

    def affinities(self, sae, x: Tensor, sparsifier: str) -> Tensor:
        major = sparsifier in kernels.FEATURE_MAJOR and self.backend.feature_major
        return kernels.pre_acts(sae, x, feature_major=major)  # no autograd

    def codes(self, sae, x: Tensor, z: Tensor, sparsifier: str, wanted: dict) -> dict | None:
        pairs = {}
        for name, want in wanted.items():
            chosen = self.select(sae, z, sparsifier, want)
            if chosen is None:
                return None
            pairs[name] = chosen
        b_in = sae.b_in  # b_dec's encoder-side use, one per shard; a transcoder has none
        b_in = None if b_in is None else self.backend.replicated(b_in)
        values = kernels.encode_pairs(sae, x, z, kernels.concat(list(pairs.values())), b_in)
        acts = kernels.split(values.relu(), pairs)  # [n_i] activations of each selection
        return {name: SparseCode(p, acts[name]) for name, p in pairs.items()}

    def select(self, sae, z: Tensor, sparsifier: str, want) -> Pairs | None:
        backend = self.backend
        if want.mask is not None:
            chosen = backend.select_masked(z, want.mask, want.k, want.rows)
            if chosen is None:
                return kernels.select_masked_topk(z, want.mask, want.k, want.rows)
            return chosen
        if sparsifier in backend.dense_only:
            return None
        m = None
        if SPARSIFIERS[sparsifier].capacities:
            m = backend.capacities(sae, z.shape[0], want.k)
        chosen = backend.select(sparsifier, z, want.k, m)
        if chosen is None:
            return kernels.index_form(sae, sparsifier)(z, want.k, m)
        return chosen

    def decode(
        self, sae, code: SparseCode, rows: slice | None = None, below: int | None = None
    ) -> Tensor:
        pairs, acts = code
        if below is not None:  # a Matryoshka prefix: its pairs alone, no dense product
            keep = pairs.feature < below
            pairs, acts = Pairs(pairs.token[keep], pairs.feature[keep], pairs.shape), acts[keep]
        x_hat = self.backend.sum_shards(kernels.decode_pairs(pairs, acts, sae.W_dec))
        return x_hat if rows is None else x_hat[rows]

    def l1(self, sae, code: SparseCode, batch_size: int) -> Tensor:
        norms = sae.W_dec.norm(dim=-1)[code.pairs.feature]  # losses.l1 over the active pairs
        return (code.acts * norms).sum() / batch_size

    def acts(self, code: SparseCode) -> Tensor:
        return kernels.sparse_acts(code.pairs, code.acts)
