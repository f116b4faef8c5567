"""Activation recomputation changes memory, not numbers: the same loss and gradients, bit for bit
on CPU in fp32, and the same parameter names (so init, optimizer state and checkpoints match)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from apogee.models.flavors import get_flavor
from apogee.models.init import init_weights
from apogee.models.llama import Transformer
from apogee.parallel.recompute import apply_recompute


def _model(mode: str) -> Transformer:
    with torch.device("meta"):
        model = Transformer(get_flavor("tiny").with_vocab(256))
    apply_recompute(list(model.layers.values()), mode)
    init_weights(model, seed=3, device=torch.device("cpu"))
    return model


def _loss_and_grads(model: Transformer) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_is_exact(mode):
    base_loss, base_grads = _loss_and_grads(_model("none"))
    model = _model(mode)
    assert [type(b).__name__ for b in model.layers.values()] == ["RecomputedTransformerBlock"] * 4
    loss, grads = _loss_and_grads(model)
    assert list(grads) == list(base_grads)  # parameter names unchanged
    assert torch.equal(loss, base_loss)
    for name in grads:
        assert torch.equal(grads[name], base_grads[name]), name
    assert set(model.state_dict()) == set(_model("none").state_dict())


def test_full_recompute_reruns_forward():
    """Full recomputation saves only the block inputs: backward runs each block's forward again."""
    model = _model("full")
    calls = []
    for block in model.layers.values():
        block.attention.register_forward_hook(lambda *_: calls.append(1))
    _loss_and_grads(model)
    assert len(calls) == 2 * len(model.layers)


def test_unknown_mode_rejected():
    with pytest.raises(ValueError, match="recompute"):
        apply_recompute([], "some")
