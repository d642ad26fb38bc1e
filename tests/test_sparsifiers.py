"""Each sparsifier against a brute-force reference written with loops and sorting."""

import pytest
import torch

from choicesae.core.sparsifiers import (
    feature_choice,
    jumprelu,
    mutual_choice,
    relu,
    sparsify,
    topk,
    uniform_capacities,
)
from choicesae.errors import ConfigError


def _top_positive(entries, n):
    """The n largest entries with a positive value; entries are (value, index) pairs."""
    return sorted((e for e in entries if e[0] > 0), key=lambda e: -e[0])[:n]


def ref_topk(z, k):
    mask = torch.zeros_like(z, dtype=torch.bool)
    for i in range(z.shape[0]):
        for _, j in _top_positive([(float(z[i, j]), j) for j in range(z.shape[1])], k):
            mask[i, j] = True
    return mask


def ref_mutual_choice(z, k):
    mask = torch.zeros_like(z, dtype=torch.bool)
    entries = [(float(z[i, j]), (i, j)) for i in range(z.shape[0]) for j in range(z.shape[1])]
    for _, (i, j) in _top_positive(entries, k * z.shape[0]):
        mask[i, j] = True
    return mask


def ref_feature_choice(z, m):
    mask = torch.zeros_like(z, dtype=torch.bool)
    for j in range(z.shape[1]):
        for _, i in _top_positive([(float(z[i, j]), i) for i in range(z.shape[0])], int(m[j])):
            mask[i, j] = True
    return mask


def tied_affinities(seed, B=12, F=20):
    """Small integers: many ties, many zeros; one all-negative row and one all-negative column."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randint(-4, 5, (B, F), generator=g).float()
    z[0] = -torch.rand(F, generator=g) - 0.1
    z[:, 1] = -1.0
    return z


def assert_valid_selection(acts, z, ref_mask, groups):
    """`acts` is a valid solution iff it keeps affinities unchanged on its selection, selects
    only positive entries, and within every group (row, column or whole batch) selects values
    equal, as a multiset, to the reference's (ties may pick different positions)."""
    sel = acts != 0
    assert torch.equal(acts[sel], z[sel])
    assert (z[sel] > 0).all()
    for group in groups:
        ours = sorted(z[group][sel[group]].tolist())
        ref = sorted(z[group][ref_mask[group]].tolist())
        assert ours == ref


def rows(B):
    return [(i, slice(None)) for i in range(B)]


def cols(F):
    return [(slice(None), j) for j in range(F)]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 3, 7])
def test_topk_matches_reference(seed, k):
    z = tied_affinities(seed)
    acts = topk(z, k).acts
    assert ((acts != 0).sum(1) <= k).all()
    assert_valid_selection(acts, z, ref_topk(z, k), rows(z.shape[0]))
    assert not acts[0].any()  # the all-negative row selects nothing


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 3, 7])
def test_mutual_choice_matches_reference(seed, k):
    z = tied_affinities(seed)
    acts = mutual_choice(z, k).acts
    ref = ref_mutual_choice(z, k)
    assert (acts != 0).sum() == ref.sum() <= k * z.shape[0]
    assert_valid_selection(acts, z, ref, [(slice(None), slice(None))])


def test_mutual_choice_takes_all_positives_when_budget_exceeds_them():
    z = torch.tensor([[1.0, -1.0], [-2.0, 3.0]])
    assert torch.equal(mutual_choice(z, 2).acts, z.relu())


@pytest.mark.parametrize("seed", range(6))
def test_feature_choice_matches_reference(seed):
    z = tied_affinities(seed)
    m = torch.randint(0, 6, (z.shape[1],), generator=torch.Generator().manual_seed(seed))
    acts = feature_choice(z, m).acts
    assert ((acts != 0).sum(0) <= m).all()
    assert_valid_selection(acts, z, ref_feature_choice(z, m), cols(z.shape[1]))
    assert not acts[:, 1].any()  # the all-negative column selects nothing


def test_relu_and_jumprelu_match_definitions():
    z = torch.randn(16, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(relu(z).acts, torch.where(z > 0, z, 0.0))
    theta = torch.linspace(-0.5, 1.0, 10)  # a negative threshold still never admits z' <= 0
    expected = torch.zeros_like(z)
    for i in range(16):
        for j in range(10):
            if z[i, j] > max(float(theta[j]), 0.0):
                expected[i, j] = z[i, j]
    assert torch.equal(jumprelu(z, theta).acts, expected)
    assert torch.equal(jumprelu(z, 0.3).acts, z * (z > 0.3))


@pytest.mark.parametrize(
    "name,ref",
    [
        ("topk", lambda z: ref_topk(z, 3)),
        ("mutual_choice", lambda z: ref_mutual_choice(z, 3)),
        ("feature_choice", lambda z: ref_feature_choice(z, torch.full((z.shape[1],), 2))),
        ("relu", lambda z: z > 0),
        ("jumprelu", lambda z: z > 0.5),
    ],
)
def test_gradients_reach_only_selected_entries(name, ref):
    """Continuous affinities (no ties): the gradient equals autograd through the reference."""
    z = torch.randn(10, 14, generator=torch.Generator().manual_seed(1), requires_grad=True)
    weight = torch.randn(10, 14, generator=torch.Generator().manual_seed(2))
    m = torch.full((14,), 2)
    acts = sparsify(name, z, k=3, m=m, theta=0.5).acts
    (grad,) = torch.autograd.grad((acts * weight).sum(), z)
    mask = ref(z.detach())
    (ref_grad,) = torch.autograd.grad((z * mask * weight).sum(), z)
    assert torch.equal(grad, ref_grad)
    assert not grad[~mask].any()


def test_sparse_pairs_are_the_selection():
    z = torch.randn(8, 12, generator=torch.Generator().manual_seed(4))  # no ties
    codes = topk(z, 2)
    assert sorted(map(tuple, codes.pairs.tolist())) == sorted(
        map(tuple, ref_topk(z, 2).nonzero().tolist())
    )
    assert torch.equal(codes.l0, ref_topk(z, 2).sum(-1))


def test_uniform_capacities():
    assert torch.equal(uniform_capacities(4, 10, 8), torch.full((8,), 5))  # floor(40 / 8)
    assert torch.equal(uniform_capacities(3, 10, 7), torch.full((7,), 4))  # floor(30 / 7)
    with pytest.raises(ConfigError, match="batch size"):
        uniform_capacities(1, 4, 8)


def test_feature_choice_rejects_bad_capacities():
    z = torch.randn(4, 6)
    with pytest.raises(ConfigError, match="shape"):
        feature_choice(z, torch.ones(5, dtype=torch.long))
    with pytest.raises(ConfigError, match="exceeds the batch size"):
        feature_choice(z, torch.full((6,), 5))


def test_unknown_sparsifier():
    with pytest.raises(ConfigError, match="unknown sparsifier 'topq'"):
        sparsify("topq", torch.randn(2, 3), k=1)
