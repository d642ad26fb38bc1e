"""Losses and metrics as pure functions of tensors.

Reconstruction error is the squared L2 error summed over d_in and averaged over tokens (the
paper's eq. 3 term |x − x̂|²); with unit-norm inputs it is on the scale of the FVU.
"""

from torch import Tensor

from choicesae.sparsifiers import topk


def mse(x_hat: Tensor, x: Tensor) -> Tensor:
    """Mean over tokens of |x − x̂|²; x, x_hat [B, d]."""
    return (x_hat - x).pow(2).sum(-1).mean()


def fvu(x_hat: Tensor, x: Tensor) -> Tensor:
    """Fraction of variance unexplained: Σ|x − x̂|² / Σ|x − mean_batch(x)|²; x, x_hat [B, d]."""
    return (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)


def l1(acts: Tensor, W_dec: Tensor) -> Tensor:
    """Mean over tokens of Σ_i |z_i|·|W_dec,i| (the norms are 1 here, kept for clarity)."""
    return (acts.abs() * W_dec.norm(dim=-1)).sum(-1).mean()


def aux_k(z_pre: Tensor, dead: Tensor, residual: Tensor, W_dec: Tensor, k_aux: int) -> Tensor:
    """aux_k_loss (Gao et al.; paper section 2.5): reconstruct the residual e = x − x̂ from each
    token's top-k_aux dead latents, ê = z_dead W_dec, scored as |e − ê|² / |e|².

    z_pre [B, F] affinities, dead [F] bool, residual [B, d] (the caller detaches it, so this loss
    only moves the dead latents), W_dec [F, d]. Zero when no latent is dead.
    """
    num_dead = int(dead.sum())  # sync point: one scalar per step
    if num_dead == 0:
        return z_pre.new_zeros(())
    z_dead = z_pre.masked_fill(~dead, float("-inf"))
    e_hat = topk(z_dead, min(k_aux, num_dead)).acts @ W_dec
    return (residual - e_hat).pow(2).sum() / residual.pow(2).sum().clamp_min(1e-12)


def l0(acts: Tensor) -> Tensor:
    """Mean active features per token; acts [B, F]."""
    return (acts != 0).sum(-1).float().mean()


def fired(acts: Tensor) -> Tensor:
    """[F] bool: which latents fired on at least one token of the batch."""
    return (acts != 0).any(0)
