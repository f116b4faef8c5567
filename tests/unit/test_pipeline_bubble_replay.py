"""benchmarks/pipeline_bubble.py's theory and its equal-device mode, without ranks: the replay of action
orders gives the closed-form bubbles, joint actions wait for all their inputs, and --fixed-ms puts each
block's fixed cost in the pass where torch's schedules run that work."""

from __future__ import annotations

import pytest
import torch
from helpers import load_benchmark

bubble = load_benchmark("pipeline_bubble")


def _one_f_one_b(p: int, m: int) -> list[list[tuple]]:
    """1F1B's order per rank (stage = rank): p - 1 - r warm-up forwards, then alternate, then drain."""
    orders = []
    for r in range(p):
        warm = min(p - 1 - r, m)
        order = [("F", r, i) for i in range(warm)]
        f, b = warm, 0
        while b < m:
            if f < m:
                order.append(("F", r, f))
                f += 1
            order.append(("B", r, b))
            b += 1
        orders.append(order)
    return orders


@pytest.mark.parametrize("p,m", [(2, 2), (4, 8), (4, 4)])
def test_replay_of_1f1b_and_gpipe_gives_the_closed_form(p, m):
    expected = (p - 1) / (m + p - 1)
    idle = bubble._simulate(_one_f_one_b(p, m), bubble.unit_cost, p)
    assert sum(idle) / p == pytest.approx(expected)
    gpipe = [[("F", r, i) for i in range(m)] + [("B", r, i) for i in range(m)] for r in range(p)]
    assert sum(bubble._simulate(gpipe, bubble.unit_cost, p)) / p == pytest.approx(expected)
    assert bubble.theory("1f1b", p, m, 1) == pytest.approx(expected)


def test_joint_actions_start_when_every_member_can():
    """Rank 1 issues F1.1 and B1.0 together: F1.1 could start at 2 (rank 0's F0.1 ends then), but B1.0
    waits for stage 2's backward of micro-batch 0, done at 4, so the pair starts at 4."""
    orders = [
        [("F", 0, 0), ("F", 0, 1), ("B", 0, 0), ("B", 0, 1)],
        [("F", 1, 0), ("F", 1, 1), ("B", 1, 0), ("B", 1, 1)],
        [("F", 2, 0), ("B", 2, 0), ("F", 2, 1), ("B", 2, 1)],
    ]

    def span(joint=()):
        idle = bubble._simulate(orders, lambda k, st, mb: 1.0, 3, joint)
        busy = 4.0  # every rank: four unit actions
        return busy / (1 - idle[1])

    apart, together = span(), span([[("F", 1, 1), ("B", 1, 0)]])
    assert together > apart
    assert span([[("B", 1, 0), ("F", 1, 1)]]) == together  # listed in either order: the executed one counts
    # Apart: F1.1 runs 2-3 while stage 2 works on micro-batch 0; together it waits until 4.
    assert together - apart == pytest.approx(1.0)


def test_fixed_costs_land_in_forward_input_and_weight_gradient_passes(monkeypatch):
    """Each block: its forward sleeps MS once; the input-gradient pass (autograd to the stage input
    alone, as torch's I) sleeps MS per block; a block's weight gradient sleeps MS more; a full backward
    both."""
    from apogee.models.flavors import ModelArgs
    from apogee.models.llama import Transformer

    slept = []
    monkeypatch.setattr(bubble.time, "sleep", slept.append)
    args = ModelArgs(dim=16, n_layers=2, n_heads=2, n_kv_heads=2, ffn_hidden=32, vocab_size=8, max_seq_len=4)
    model = Transformer(args)
    model.tok_embeddings = None  # a middle stage: takes hidden states
    bubble._fix_block_costs(model, 0.5)
    x = torch.randn(1, 4, 16, requires_grad=True)
    out = model(x)
    assert slept == [0.5, 0.5]  # F: one per block
    slept.clear()
    weights = [p for p in model.parameters()]
    (gx,) = torch.autograd.grad(out.sum(), x, retain_graph=True)  # I: the input gradient alone
    assert slept == [0.5, 0.5] and gx.shape == x.shape
    slept.clear()
    # W of the last block: its hold weight's gradient (torch's weight pass starts from the gradients the
    # input pass captured at each block, so it never re-runs an input-gradient node).
    torch.autograd.grad(out.sum(), model.layers["1"].hold_weight, retain_graph=True)
    assert slept == [0.5]
    slept.clear()
    out.sum().backward(inputs=[x, *weights])  # B: both
    assert slept == [0.5] * 4
