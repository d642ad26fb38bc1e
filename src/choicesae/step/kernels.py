"""The fast training step: selection in index form, a sparse encoder backward, a sparse decoder.

An SAE step needs one dense product, the encoder's z' = (x − b_dec) W_enc + b_enc (2·B·d·F
flops). A selection is a budget of n ≈ k·B token-feature matches (paper section 3.1), and
everything after it touches only those pairs:

- `select_*` return `Pairs` (indices) computed from z' without autograd;
- `encode_pairs` gathers z' at the pairs; its backward builds the gradients of W_enc, b_enc,
  b_dec (and x) from the n pairs, never a dense [B, F] gradient or a second dense product;
- `decode_pairs` is acts @ W_dec for acts given as (pairs, values); its backward touches only
  the selected rows of W_dec.

Values are ReLU'd after the gather as in the reference sparsifiers (appendix H), so a selected
non-positive affinity is a zero activation with a zero gradient. The plain functions of
sparsifiers.py stay the reference the tests compare with. The sparse work runs in float32 with
autocast off, so under bf16 autocast only the dense product runs in bf16.
"""

import warnings
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as Fn
from torch import Tensor

from choicesae.errors import ConfigError


class Pairs(NamedTuple):
    """n selected (token, feature) matches of a [B, F] batch, sorted by token then feature
    (CSR order) unless made by `concat`. Each pair appears at most once."""

    token: Tensor  # [n] long
    feature: Tensor  # [n] long
    shape: tuple[int, int]  # (B, F)


def _argsort(key: Tensor, bound: int) -> Tensor:
    """Argsort of key [n] with values < bound. Not stable: the keys are unique (CSR order) or
    only group pairs for a sum. On CPU numpy's single-threaded sort of int32 keys: torch's
    parallel integer sort stalls when the cores are shared (131k keys: 200 ms against 1.5)."""
    key = key.int() if bound < 2**31 else key
    if key.device.type == "cpu":
        return torch.from_numpy(np.argsort(key.numpy()))
    return torch.sort(key).indices


def _csr_order(token: Tensor, feature: Tensor, shape: tuple[int, int]) -> Pairs:
    B, F = shape
    order = _argsort(token * F + feature, B * F)  # one sort of n keys
    return Pairs(token[order], feature[order], shape)


def _from_rows(indices: Tensor, F: int) -> Pairs:
    """Pairs from per-token feature indices [B, K] (token t chose row t)."""
    B, K = indices.shape
    token = torch.arange(B, device=indices.device)[:, None].expand(B, K).flatten()
    return Pairs(token, indices.sort(dim=1).values.flatten(), (B, F))


def concat(pairs: list[Pairs]) -> Pairs:
    """Several selections of one batch as one (not CSR-ordered; pairs may repeat): the input of
    `encode_pairs`, so that one sparse backward serves the main and the auxiliary losses."""
    if len(pairs) == 1:
        return pairs[0]
    token = torch.cat([p.token for p in pairs])
    return Pairs(token, torch.cat([p.feature for p in pairs]), pairs[0].shape)


# ---- selection (no autograd): the index form of each sparsifier -------------------------------


def select_topk(z_pre: Tensor, k: int) -> Pairs:
    """Token Choice (sparsifiers.topk): each token's k largest affinities; z_pre [B, F]."""
    return _from_rows(z_pre.topk(k, dim=1, sorted=False).indices, z_pre.shape[1])


def select_mutual_choice(z_pre: Tensor, k: int, sample: int = 256) -> Pairs:
    """Mutual Choice (sparsifiers.mutual_choice): the M = k·B largest affinities of the batch,
    without a top-M over all B·F of them.

    The candidates are the affinities above a threshold t. If at least M of them exceed t, so
    does the M-th largest, and the top M of the candidates is exact. t is estimated from
    `sample` evenly spaced tokens (each one's top 2k stand for its row) to leave about 1.5·M
    candidates. If fewer than M exceed it, t drops to 0, which is exact whatever the count:
    non-positive affinities are zeros after ReLU (appendix H), so they may be left out.
    """
    B, F = z_pre.shape
    M = min(k * B, B * F)
    rows = z_pre[:: max(1, B // sample)]  # [S, F]
    proposals = rows.topk(min(F, 2 * k), dim=1, sorted=False).values.flatten()
    rank = min(len(proposals), 3 * M * len(rows) // (2 * B) + 1)
    t = proposals.topk(rank, sorted=False).values.min().clamp(min=0)
    above = (z_pre > t).nonzero()  # [c, 2] (token, feature) in CSR order; sync point
    if len(above) < M and t > 0:  # the sample misjudged the batch: take every positive one
        above = (z_pre > 0).nonzero()
    if len(above) > M:
        chosen = z_pre[above[:, 0], above[:, 1]].topk(M, sorted=False).indices
        keep = torch.zeros(len(above), dtype=torch.bool, device=z_pre.device)
        above = above[keep.index_fill_(0, chosen, True)]  # a mask keeps the CSR order
    token, feature = above.t().contiguous()  # [n] each, contiguous
    return Pairs(token, feature, (B, F))


def select_feature_choice(z_pre: Tensor, m: Tensor) -> Pairs:
    """Feature Choice (sparsifiers.feature_choice): feature i keeps its m[i] largest affinities,
    for any capacities m [F] (uniform, or Zipf by Algorithm 1).

    Works on z'ᵀ [F, B], contiguous when z_pre comes from `pre_acts(..., feature_major=True)`,
    so a feature's choice is a top-k over one contiguous row. Features are grouped by ⌈log2 m_i⌉:
    one top-k per group, each row read once, and no feature asks for more than twice its m_i.
    """
    B, F = z_pre.shape
    if m.shape != (F,):
        raise ConfigError(f"feature_choice capacities m must have shape [{F}], not {list(m.shape)}")
    if int(m.max()) > B:
        raise ConfigError(f"feature_choice capacity {int(m.max())} exceeds the batch size {B}")
    m, z_t = m.to(z_pre.device), z_pre.t()  # z_t [F, B]
    group = torch.where(m > 0, torch.log2(m.clamp(min=1).double()).ceil().long(), -1)
    token, feature = [], []
    for g in group.unique().tolist():
        if g < 0:  # capacity 0: the feature picks nothing
            continue
        rows = (group == g).nonzero()[:, 0]  # [R]
        cap = m[rows]
        idx = (z_t if len(rows) == F else z_t[rows]).topk(int(cap.max()), dim=1).indices
        keep = torch.arange(idx.shape[1], device=z_pre.device) < cap[:, None]  # sorted: rank
        token.append(idx[keep])
        feature.append(rows[:, None].expand_as(idx)[keep])
    if not token:  # every capacity 0: an empty selection
        empty = m.new_zeros(0)
        return Pairs(empty, empty, (B, F))
    return _csr_order(torch.cat(token), torch.cat(feature), (B, F))


def select_masked_topk(z_pre: Tensor, mask: Tensor, k: int, rows: slice = slice(None)) -> Pairs:
    """Each token's min(k, |mask|) largest affinities among the features in mask [F], for the
    tokens `rows` of the batch (losses.aux_rows): the latents of aux_k_loss (mask = dead) or
    aux_zipf_loss (mask = dying), as in losses.aux_k."""
    B, F = z_pre.shape
    cols = mask.nonzero()[:, 0]  # [D]
    if len(cols) == 0:
        empty = cols.new_zeros(0)
        return Pairs(empty, empty, (B, F))
    idx = z_pre[rows][:, cols].topk(min(k, len(cols)), dim=1, sorted=False).indices  # [B', k']
    return at_rows(_from_rows(cols[idx], F), rows, B)


def at_rows(pairs: Pairs, rows: slice, B: int) -> Pairs:
    """Pairs chosen among the tokens `rows` of a batch of B, numbered in the batch (CSR order
    kept)."""
    start, _, step = rows.indices(B)
    return Pairs(pairs.token * step + start, pairs.feature, (B, pairs.shape[1]))


RELU_SPARSE_SHARE = 1 / 16  # above this share of active pairs, dense products are faster


def select_relu(z_pre: Tensor) -> Pairs | None:
    """Every positive affinity (sparsifiers.relu), or None while more than RELU_SPARSE_SHARE
    of them are positive (early in training, before L1 has acted): the dense step is faster."""
    positive = z_pre > 0
    if positive.sum() > RELU_SPARSE_SHARE * positive.numel():  # a sync point
        return None
    return Pairs(*positive.nonzero().T, z_pre.shape)  # row-major: CSR order


FEATURE_MAJOR = ("feature_choice",)  # index forms that read z'ᵀ [F, B] rows (`pre_acts`)
INDEX = {  # the index form of each sparsifier of sparsifiers.SPARSIFIERS: (z', k, m) -> Pairs
    "topk": lambda z_pre, k, m: select_topk(z_pre, k),
    "mutual_choice": lambda z_pre, k, m: select_mutual_choice(z_pre, k),
    "feature_choice": lambda z_pre, k, m: select_feature_choice(z_pre, m),
    "relu": lambda z_pre, k, m: select_relu(z_pre),
}


def index_form(sae, name: str):
    """The index form (z', k, m) -> Pairs | None of sparsifier `name` for `sae`: INDEX's, or
    within each layer's block of a cross-layer transcoder's latents (cfg.per_layer, as
    SAE.rule)."""
    return per_layer(INDEX[name], sae.cfg.layers) if sae.cfg.per_layer else INDEX[name]


def per_layer(index, layers: int):
    """The index form `index` (z', k, m) -> Pairs | None applied within each of `layers`
    blocks of z' [B, L·F] with budget k / L, capacities m [L·F] cut the same way, the pairs
    of the blocks joined; None where a block's is None."""

    def within(z_pre: Tensor, k: int, m: Tensor | None) -> Pairs | None:
        B, F = z_pre.shape
        f = F // layers
        found = [
            index(z_pre[:, lo : lo + f], k // layers, None if m is None else m[lo : lo + f])
            for lo in range(0, F, f)
        ]
        if any(p is None for p in found):
            return None
        token = torch.cat([p.token for p in found])
        feature = torch.cat([p.feature + i * f for i, p in enumerate(found)])
        return _csr_order(token, feature, (B, F))

    return within


# ---- sparse products -------------------------------------------------------------------------


def _offsets(index: Tensor, size: int) -> Tensor:
    """[size + 1] where each value of a sorted index [n] starts (CSR row pointers)."""
    return torch.searchsorted(index, torch.arange(size + 1, device=index.device))


def _bag(index: Tensor, table: Tensor, offsets: Tensor, weights: Tensor) -> Tensor:
    """[len(offsets) − 1, d]: row j = Σ_{p in group j} weights[p] · table[index[p]], the product
    of a sparse matrix (groups × rows of table) and a dense one, without gathering [n, d]."""
    return Fn.embedding_bag(
        index, table, offsets, mode="sum", per_sample_weights=weights, include_last_offset=True
    )


def _by(index: Tensor, size: int, *others: Tensor) -> tuple[Tensor, ...]:
    """`others` reordered so that equal values of index [n] < size are adjacent, and the
    group offsets: the CSR form of the pairs' transpose when index is the feature."""
    order = _argsort(index, size)
    return (_offsets(index[order], size), *(t[order] for t in others))


def _no_autocast(t: Tensor):
    return torch.autocast(t.device.type, enabled=False)


class _EncodePairs(torch.autograd.Function):
    """z'[pairs] gathered from a precomputed z', with the backward of
    z' = (x − b_dec) W_enc + b_enc restricted to the pairs: O(n·d) work, no dense product."""

    @staticmethod
    def forward(ctx, z_pre, x, W_enc, b_enc, b_dec, pairs: Pairs):
        ctx.save_for_backward(x, W_enc, b_dec)
        ctx.pairs = pairs
        return z_pre[pairs.token, pairs.feature].float()

    @staticmethod
    def backward(ctx, grad):  # grad [n] = ∂L/∂z' at the pairs
        x, W_enc, b_dec = ctx.saved_tensors
        (token, feature, (B, F)), grad = ctx.pairs, grad.float()
        with _no_autocast(grad):
            grad_b_enc = grad.new_zeros(F).index_add_(0, feature, grad)  # [F]
            offsets, token_f, grad_f = _by(feature, F, token, grad)
            xc = (x if b_dec is None else x - b_dec).float()  # [B, d]
            # [d, F] as a transposed [F, d]: the layout SAE gives W_enc (a clone of W_decᵀ)
            grad_W_enc = _bag(token_f, xc, offsets, grad_f).t()
            grad_b_dec = None  # a transcoder's encoder reads no b_dec
            if b_dec is not None:
                grad_b_dec = -(W_enc.float() @ grad_b_enc)  # ∂z'/∂b_dec = −W_enc, summed
            grad_x = None
            if ctx.needs_input_grad[1]:
                offsets, feature_t, grad_t = _by(token, B, feature, grad)
                W_t = W_enc.float().t().contiguous()  # [F, d]
                grad_x = _bag(feature_t, W_t, offsets, grad_t)
        return None, grad_x, grad_W_enc, grad_b_enc, grad_b_dec, None


class _DecodePairs(torch.autograd.Function):
    """acts @ W_dec for acts given as (pairs, values [n]); pairs in CSR order."""

    @staticmethod
    def forward(ctx, values, W_dec, pairs: Pairs):
        ctx.save_for_backward(values, W_dec)
        ctx.pairs = pairs
        with _no_autocast(values):
            offsets = _offsets(pairs.token, pairs.shape[0])
            return _bag(pairs.feature, W_dec.float(), offsets, values.float())

    @staticmethod
    def backward(ctx, grad):  # grad [B, d] = ∂L/∂x̂
        values, W_dec = ctx.saved_tensors
        (token, feature, (B, F)), grad = ctx.pairs, grad.float()
        with _no_autocast(grad):
            # ∂L/∂value_p = ⟨∂L/∂x̂[token_p], W_dec[feature_p]⟩: a sampled product at the pairs
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore")
                pattern = torch.sparse_csr_tensor(
                    _offsets(token, B), feature, grad.new_zeros(len(feature)), (B, F)
                )
            sampled = torch.sparse.sampled_addmm(pattern, grad, W_dec.float().t(), beta=0.0)
            offsets, token_f, values_f = _by(feature, F, token, values.float())
            grad_W_dec = _bag(token_f, grad, offsets, values_f)  # [F, d], rows of W_dec used
        return sampled.values(), grad_W_dec, None


def pre_acts(sae, x: Tensor, feature_major: bool = False) -> Tensor:
    """Affinities z' [B, F] of normalized x [B, d_in] without autograd: the step's one dense
    product. feature_major stores them as z'ᵀ [F, B] (a transposed view is returned) so that
    Feature Choice's per-feature top-k reads contiguous rows. The bias is added in place: on CPU
    addmm's broadcast copy of it costs several times more."""
    with torch.no_grad():
        z = sae.product(sae.centred(x), feature_major)
        if feature_major:
            return z.add_(sae.b_enc[:, None]).t()
        return z.add_(sae.b_enc)


def encode_pairs(
    sae, x: Tensor, z_pre: Tensor, pairs: Pairs, b_dec: Tensor | None = None
) -> Tensor:
    """[n] float32 affinities z'[pairs] (z_pre from `pre_acts`), differentiable in the SAE's
    encoder and in x through the sparse backward. `b_dec` stands for sae.b_in (parallel/features.py
    passes one whose gradient sums over the ranks' shards; a transcoder has none)."""
    b_dec = sae.b_in if b_dec is None else b_dec
    return _EncodePairs.apply(z_pre, x, sae.W_enc, sae.b_enc, b_dec, pairs)


def decode_pairs(pairs: Pairs, acts: Tensor, W_dec: Tensor) -> Tensor:
    """[B, d] = acts @ W_dec with the activations acts [n] at `pairs` (CSR order); no bias."""
    return _DecodePairs.apply(acts, W_dec, pairs)


def sparse_acts(pairs: Pairs, acts: Tensor) -> Tensor:
    """The activations as a coalesced sparse COO [B, F] tensor (detached): what the step
    returns for firing counts and L0, instead of a dense [B, F] matrix."""
    indices = torch.stack([pairs.token, pairs.feature])
    return torch.sparse_coo_tensor(
        indices, acts.detach(), pairs.shape, is_coalesced=True, check_invariants=False
    )


def split(values: Tensor, pairs: dict[str, Pairs]) -> dict[str, Tensor]:
    """values [Σ n_i] of `concat(pairs)` back into one [n_i] per selection."""
    if len(pairs) == 1:
        return dict.fromkeys(pairs, values)
    sizes = [len(p.token) for p in pairs.values()]
    return dict(zip(pairs, values.split(sizes), strict=True))
