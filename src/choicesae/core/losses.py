"""Losses and metrics as pure functions of tensors.

Reconstruction error is the squared L2 error summed over d_in and averaged over tokens (the
paper's eq. 3 term |x − x̂|²); with unit-norm inputs it is on the scale of the FVU.
"""

import math

import torch
from torch import Tensor

from choicesae.core.sparsifiers import Sparse, topk


def mse(x_hat: Tensor, x: Tensor) -> Tensor:
    """Mean over tokens of |x − x̂|²; x, x_hat [B, d]."""
    return (x_hat - x).pow(2).sum(-1).mean()


def fvu(x_hat: Tensor, x: Tensor) -> Tensor:
    """Fraction of variance unexplained: Σ|x − x̂|² / Σ|x − mean_batch(x)|²; x, x_hat [B, d]."""
    return (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)


def l1(acts: Tensor, W_dec: Tensor) -> Tensor:
    """Mean over tokens of Σ_i |z_i|·|W_dec,i| (the norms are 1 here, kept for clarity)."""
    return (acts.abs() * W_dec.norm(dim=-1)).sum(-1).mean()


AUX_SHARE = 1 / 4  # each aux loss selects at most this share of the code's k·B pairs


def aux_rows(k: int, k_aux: int) -> slice:
    """The tokens of a batch the aux losses read: every s-th, s the smallest power of two with
    k_aux·B/s <= AUX_SHARE·k·B, so that each aux loss costs a bounded share of the step
    whatever the number of dead or dying latents (k_aux = 512 on every token made the step
    2.5-5x slower). The loss is a ratio of sums over these tokens, an estimate of the batch's.
    Under data parallel the ranks' rows are those of one process when s divides the slice."""
    return slice(None, None, 1 << max(0, math.ceil(math.log2(k_aux / (AUX_SHARE * k)))))


def masked_topk(z_pre: Tensor, mask: Tensor, k_aux: int) -> Sparse:
    """Each token's top-k_aux latents among `mask`: the latents that reconstruct the residual
    e = x − x̂ in aux_k_loss (mask = the dead latents; Gao et al., paper section 2.5) and in
    aux_zipf_loss (mask = the dying ones; section 4.2), its generalisation. z_pre [B, F], mask
    [F] bool and not empty."""
    count = int(mask.sum())  # sync point: one scalar per step
    return topk(z_pre.masked_fill(~mask, float("-inf")), min(k_aux, count))


def unexplained(e: Tensor, e_hat: Tensor) -> Tensor:
    """|e − ê|² / |e|² over a batch: the aux losses' score of their reconstruction ê [B, d] of
    the residual e [B, d] (detached by the caller, so that they only move their latents)."""
    return (e - e_hat).pow(2).sum() / e.pow(2).sum().clamp_min(1e-12)


def _unit_rows(W: Tensor) -> Tensor:
    return W / W.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def nfm(W_dec: Tensor) -> Tensor:
    """nfm_loss (appendix C): |Ŵ Ŵᵀ|_F for the row-normalised decoder Ŵ [F, d], computed as
    |Ŵᵀ Ŵ|_F (the two Gram matrices share their non-zero eigenvalues): a d×d product, never
    the F×F matrix. The diagonal (F ones) is included, as in the paper's definition."""
    W = _unit_rows(W_dec)
    return (W.T @ W).norm()


def nfm_inf(W_dec: Tensor, rows: Tensor | None = None, chunk: int = 4096) -> Tensor:
    """nfm_inf_loss (appendix C): mean over features i of max_{j≠i} nfm(W_dec)_ij, the largest
    similarity of each decoder row to another row. The diagonal (always 1) is excluded, or the
    loss would be constant. Rows are processed `chunk` at a time (memory chunk×F); `rows` [n]
    restricts the mean to a sample of features, an unbiased estimate for very wide SAEs."""
    W = _unit_rows(W_dec)
    rows = torch.arange(len(W), device=W.device) if rows is None else rows
    maxima = []
    for ids in rows.split(chunk):
        sims = W[ids] @ W.T  # [chunk, F]
        sims[torch.arange(len(ids), device=W.device), ids] = float("-inf")
        maxima.append(sims.max(-1).values)
    return torch.cat(maxima).mean()
