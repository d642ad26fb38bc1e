"""The objective of one training step (paper eq. 3), assembled here and nowhere else.

    z' = affinities(x);  the selections: the code at budget k (and 4k, Multi-TopK), and each
         auxiliary loss's latents;  x̂ = decode(code) + b_dec (+ x W_skip)
    loss = |y − x̂|²  [+ Σ_j w_j |y − x̂_{<m_j}|² (Matryoshka)]  [+ |y − x̂_4k|²/8]
           [+ λ·L1 (relu)]  [+ aux_k + aux_zipf]  [+ NFM]

with the target y = x for an autoencoder, and another hookpoint's activations for a transcoder.

Which terms a sparsifier trains with comes from its entry in the registry
(`sparsifiers.SPARSIFIERS`). How a selection is made and decoded comes from the ops: the dense
reference (`ops.Dense`, the plain sparsifiers and autograd) or the sparse index kernels
(`ops.Sparse`), each over a parallel backend that selects over the global batch or over all
latents and sums what the shards hold (one process: the identity).
"""

from typing import NamedTuple

import torch
from torch import Tensor

from choicesae.core.losses import aux_rows, mse, nfm, nfm_inf, unexplained
from choicesae.core.sparsifiers import SPARSIFIERS
from choicesae.step.ops import Dense


class StepOut(NamedTuple):
    loss: Tensor  # scalar, the sum of `terms`
    terms: dict[str, Tensor]  # weighted loss terms, for logging
    acts: Tensor  # [B, F] dense, or sparse COO from the sparse kernels
    x_hat: Tensor  # [B, d_in]


class Masks(NamedTuple):
    dead: Tensor  # [F] not fired for cfg.dead_tokens tokens: aux_k_loss acts on these
    dying: Tensor  # [F] Definition 3.1 but not dead: aux_zipf_loss acts on these


class Want(NamedTuple):
    """One selection a loss term needs: the code at budget k, or (mask given) each token's top
    k latents among mask [F] for the tokens `rows`, the latents of an auxiliary loss."""

    k: int
    mask: Tensor | None = None
    rows: slice = slice(None)


AUX_MASKS = {"aux_k": "dead", "aux_zipf": "dying"}  # the latents each aux loss acts on
AUX_ZIPF_DEFAULT = 1 / 32  # --aux-zipf-coeff -1, where the registry turns aux_zipf on


def aux_coeffs(cfg, sparsifier: str) -> dict[str, float]:
    """The weights of the aux losses `sparsifier` trains with (none for Feature Choice and
    relu); aux_zipf left at -1 takes the registry's default for the sparsifier."""
    rule = SPARSIFIERS[sparsifier]
    if not rule.aux:
        return {}
    zipf = cfg.aux_zipf_coeff
    if zipf == -1:
        zipf = AUX_ZIPF_DEFAULT if rule.aux_zipf else 0.0
    return {name: c for name, c in (("aux_k", cfg.aux_k_coeff), ("aux_zipf", zipf)) if c}


def wanted(cfg, sparsifier: str, k: int, masks: Masks) -> dict[str, Want]:
    """The selections of a step, keyed by the loss term that uses them; an aux loss whose mask
    is empty selects nothing (its term is zero)."""
    want = {"mse": Want(k)}
    if cfg.multi_topk:  # Gao et al. 5.3.1: L(k) + L(4k)/8
        want["mse_4k"] = Want(4 * k)
    for name in aux_coeffs(cfg, sparsifier):
        mask = getattr(masks, AUX_MASKS[name])
        if mask.any():  # a sync point, one scalar per mask
            want[name] = Want(cfg.k_aux, mask, aux_rows(k, cfg.k_aux))
    return want


def objective(
    sae,
    x: Tensor,
    cfg,
    sparsifier: str,
    masks: Masks,
    step: int = 0,
    ops=None,
    target: Tensor | None = None,
) -> StepOut:
    """The loss terms of normalized inputs x [B, d_in] (this process's rows or the whole batch,
    as the backend of `ops` holds them) against the normalized `target` [B, d_target] (None:
    x itself, an autoencoder), with the ops given or the dense reference."""
    rule, k, ops = SPARSIFIERS[sparsifier], sae.cfg.k, ops or Dense()
    y = x if target is None else target
    z = ops.affinities(sae, x, sparsifier)  # [B, F] (this process's latents)
    codes = ops.codes(sae, x, z, sparsifier, wanted(cfg, sparsifier, k, masks))
    if codes is None:  # no sparse form for this batch: the dense reference step
        return objective(sae, x, cfg, sparsifier, masks, step, ops.reference, target)
    base = sae.base(x)  # b_dec (+ a skip transcoder's x W_skip)
    x_hat = ops.decode(sae, codes["mse"]) + base
    terms = {"mse": mse(x_hat, y)}
    for m, weight in cfg.prefixes:  # Matryoshka: the code's pairs with feature index < m
        terms[f"mse_{m}"] = weight * mse(ops.decode(sae, codes["mse"], below=m) + base, y)
    if cfg.multi_topk:
        terms["mse_4k"] = mse(ops.decode(sae, codes["mse_4k"]) + base, y) / 8
    if rule.l1:
        terms["l1"] = cfg.l1_coeff * ops.l1(sae, codes["mse"], x.shape[0])
    aux = aux_coeffs(cfg, sparsifier)
    if aux:
        rows = aux_rows(k, cfg.k_aux)  # the aux losses read a bounded sample of tokens
        residual = (y - x_hat).detach()[rows]  # they only move the latents they select
    for name, coeff in aux.items():
        term = x.new_zeros(())  # no dead (or dying) latent: nothing to reconstruct with
        if name in codes:
            term = unexplained(residual, ops.decode(sae, codes[name], rows))
        terms[name] = coeff * term
    terms |= nfm_terms(sae.W_dec, cfg, step)
    return StepOut(sum(terms.values()), terms, ops.acts(codes["mse"]), x_hat)


def nfm_terms(W_dec: Tensor, cfg, step: int) -> dict[str, Tensor]:
    """The weighted NFM losses of appendix C that are switched on."""
    terms = {}
    if cfg.nfm_coeff:
        terms["nfm"] = cfg.nfm_coeff * nfm(W_dec)
    if cfg.nfm_inf_coeff:
        terms["nfm_inf"] = cfg.nfm_inf_coeff * nfm_inf(W_dec, nfm_rows(cfg, step))
    return terms


def nfm_rows(cfg, step: int) -> Tensor | None:
    """The decoder rows sampled for nfm_inf_loss at `step` (a pure function of seed and step)."""
    F = cfg.sae.num_latents
    if not cfg.nfm_inf_sample or cfg.nfm_inf_sample >= F:
        return None
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    return torch.randperm(F, generator=gen)[: cfg.nfm_inf_sample].to(cfg.device)
