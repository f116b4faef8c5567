"""Gradient clipping on one process: the global norm and the scaled gradients are torch's own."""

import pytest
import torch
from torch import nn

from apogee.train.optim import clip_grad_norm


def model_with_grads(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 8))
    model(torch.randn(4, 16)).pow(2).sum().backward()
    return model


@pytest.mark.parametrize("max_norm", [0.5, 1e6, 0.0])
def test_clip_grad_norm_matches_torch(max_norm):
    ours, theirs = model_with_grads(0), model_with_grads(0)
    norm = clip_grad_norm(ours, max_norm)
    expected = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm if max_norm > 0 else float("inf"))
    assert norm == pytest.approx(expected.item(), rel=1e-6)
    assert norm > 1.0  # the clipped case really clips
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)


def test_counted_elsewhere_is_clipped_but_not_counted():
    model = model_with_grads(1)
    out = model[2].weight
    rest = sum(p.grad.pow(2).sum() for p in model.parameters() if p is not out).sqrt().item()
    before = out.grad.clone()
    norm = clip_grad_norm(model, 0.1, counted_elsewhere=[out])
    assert norm == pytest.approx(rest, rel=1e-6)
    torch.testing.assert_close(out.grad, before * (0.1 / (rest + 1e-6)))
