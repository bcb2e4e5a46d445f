"""Exact factored arithmetic and the re-factorisation to a LoRA rank."""

import pytest
import torch

from clair_lightning import refactorize
from clair_lightning.core.factors import stack_products


def _random(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_stack_products_is_the_weighted_sum_of_products():
    terms = [
        (0.2, _random(9, 2, seed=1), _random(2, 7, seed=2)),
        (0.8, _random(9, 3, seed=3), _random(3, 7, seed=4)),
    ]
    b, a = stack_products(terms)
    assert b.shape == (9, 5) and a.shape == (5, 7)
    torch.testing.assert_close(b @ a, sum(c * bi @ ai for c, bi, ai in terms))


@pytest.mark.parametrize("split", ["balanced", "orthonormal_a"])
def test_refactorize_is_the_truncated_svd(split):
    b, a = _random(30, 8, seed=5), _random(8, 20, seed=6)
    dense = b @ a
    u, s, vh = torch.linalg.svd(dense)
    result = refactorize(b, a, 3, split=split)
    assert result.b.shape == (30, 3) and result.a.shape == (3, 20)
    torch.testing.assert_close(result.b @ result.a, (u[:, :3] * s[:3]) @ vh[:3])
    assert result.relative_error == pytest.approx(float(s[3:].norm() / s.norm()))
    if split == "orthonormal_a":
        torch.testing.assert_close(result.a @ result.a.T, torch.eye(3, dtype=torch.float64))
    else:
        torch.testing.assert_close(result.b.norm(dim=0), result.a.norm(dim=1))


def test_refactorize_pads_with_zeros_when_the_product_has_lower_rank():
    b, a = _random(10, 2, seed=7), _random(2, 6, seed=8)
    result = refactorize(b, a, 4)
    assert result.relative_error == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(result.b @ result.a, b @ a)
    assert result.b[:, 2:].abs().max() == 0 and result.a[2:].abs().max() == 0


def test_refactorize_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rank must be at least 1"):
        refactorize(_random(4, 2), _random(2, 3), 0)
    with pytest.raises(ValueError, match="split"):
        refactorize(_random(4, 2), _random(2, 3), 1, split="left")
