import torch

from choicesae.core.losses import AUX_SHARE, aux_rows, fvu, l1, masked_topk, mse, unexplained


def aux_k(z, mask, residual, W_dec, k_aux):
    """aux_k_loss as the objective assembles it (for a mask that is not empty)."""
    return unexplained(residual, masked_topk(z, mask, k_aux).acts @ W_dec)


def test_mse_and_fvu_closed_forms():
    g = torch.Generator().manual_seed(0)
    x, x_hat = torch.randn(32, 5, generator=g), torch.randn(32, 5, generator=g)
    per_token = [
        sum((float(x_hat[i, j]) - float(x[i, j])) ** 2 for j in range(5)) for i in range(32)
    ]
    assert torch.isclose(mse(x_hat, x), torch.tensor(sum(per_token) / 32))
    variance = ((x - x.mean(0)) ** 2).sum()
    assert torch.isclose(fvu(x_hat, x), torch.tensor(sum(per_token)) / variance)
    assert torch.isclose(fvu(x.mean(0).expand_as(x), x), torch.tensor(1.0))  # mean predictor
    assert fvu(x, x) == 0


def test_l1():
    acts = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.5, 0.0]])
    W_dec = torch.eye(3)
    assert torch.isclose(l1(acts, W_dec), torch.tensor(3.5 / 2))


def test_aux_k_matches_definition_and_moves_only_dead_latents():
    g = torch.Generator().manual_seed(1)
    B, F, d, k_aux = 8, 10, 4, 2
    z = torch.randn(B, F, generator=g, requires_grad=True)
    W_dec = torch.randn(F, d, generator=g, requires_grad=True)
    residual = torch.randn(B, d, generator=g)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[[1, 4, 7]] = True
    loss = aux_k(z, dead, residual, W_dec, k_aux)

    # written out: each token's k_aux largest positive dead affinities reconstruct the residual
    e_hat = torch.zeros(B, d)
    for i in range(B):
        zi = z[i].detach()
        chosen = sorted(((float(zi[j]), j) for j in (1, 4, 7) if zi[j] > 0), reverse=True)
        for value, j in chosen[:k_aux]:
            e_hat[i] += value * W_dec[j].detach()
    expected = ((residual - e_hat) ** 2).sum() / (residual**2).sum()
    assert torch.isclose(loss, expected)

    loss.backward()
    assert not z.grad[:, ~dead].any() and z.grad[:, dead].any()
    assert not W_dec.grad[~dead].any()


def test_aux_k_uses_all_dead_when_fewer_than_k_aux():
    z = torch.tensor([[3.0, 1.0, 2.0]])
    dead = torch.tensor([True, False, True])
    W_dec = torch.eye(3)
    residual = torch.tensor([[3.0, 0.0, 2.0]])  # exactly the two dead latents
    assert aux_k(z, dead, residual, W_dec, 512) == 0


def test_aux_rows_bound_the_aux_pairs_with_the_fewest_tokens_dropped():
    """Each aux loss selects at most AUX_SHARE of the code's k·B pairs, reading every s-th
    token with s the smallest power of two that does it."""
    B = 4096
    for k, k_aux in [(32, 512), (8, 512), (32, 8), (16, 192), (4, 16)]:
        rows = aux_rows(k, k_aux)
        s = rows.step
        assert s & (s - 1) == 0 and rows.start is None
        assert len(range(B)[rows]) * k_aux <= AUX_SHARE * k * B
        assert s == 1 or len(range(B)[:: s // 2]) * k_aux > AUX_SHARE * k * B
    assert aux_rows(32, 512).step == 64  # the defaults: every 64th token
