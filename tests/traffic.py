"""What apogee's model moves through memory, counted: the bytes every memory-bound op reads and writes
(its tensor operands and results) in one forward + loss + backward, by op, with GEMMs and attention
apart. Compared with the planner's byte table (planner.compute.ENGINE_BLOCK_BYTES) by
tests/unit/test_planner_traffic.py.

Three ops are counted as the GPU kernels that run them rather than as their CPU form:
- RMSNorm: on CUDA ``F.rms_norm`` is one fused kernel (``_fused_rms_norm``: read x, write y and the
  reciprocal RMS; its backward reads dy, x and the RMS and writes dx); on CPU it decomposes into five
  ops. The block's ``F.rms_norm`` is swapped for that accounting while counting.
- nll_loss forward reads one log-probability per row, not the whole [tokens, vocab] operand it is
  given; its backward only writes the [tokens, vocab] gradient.
- embedding forward reads the looked-up rows, not the whole table.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import apogee.models.llama as llama
from apogee.models.flavors import ModelArgs
from apogee.models.init import init_weights
from apogee.models.llama import Transformer
from apogee.parallel.recompute import apply_recompute

aten = torch.ops.aten
GEMMS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}
# Ops that only re-describe storage (no kernel, no bytes moved).
VIEWS = {"detach", "alias", "lift_fresh", "_unsafe_view", "view", "t", "transpose", "expand", "unsqueeze",
         "squeeze", "slice", "select", "permute", "unbind", "split", "split_with_sizes", "as_strided",
         "unflatten", "_reshape_alias"}


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class Traffic(TorchDispatchMode):
    """Bytes per (category, op name): category "elem" (memory-bound), "gemm" or "attn"."""

    def __init__(self):
        super().__init__()
        self.bytes: dict[tuple[str, str], int] = {}
        self.paused = 0

    def add(self, cat: str, name: str, nbytes: int) -> None:
        self.bytes[cat, name] = self.bytes.get((cat, name), 0) + nbytes

    def total(self, cat: str = "elem") -> int:
        return sum(v for (c, _), v in self.bytes.items() if c == cat)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if self.paused or func.is_view or name in VIEWS:
            return out
        if func in GEMMS:
            self.add("gemm", name, _nbytes(tree_leaves((args, kwargs, out))))
        elif "scaled_dot_product" in name:
            self.add("attn", name, _nbytes(tree_leaves((args, kwargs, out))))
        elif name == "nll_loss_forward":  # (self, target, ...): one value per row
            self.add("elem", name, _nbytes([args[1], *tree_leaves(out)]) + args[1].numel() * args[0].element_size())
        elif name == "nll_loss_backward":  # (grad_output, self, target, ...): writes the gradient
            self.add("elem", name, _nbytes([args[0], args[2], *tree_leaves(out)]))
        elif name == "embedding":  # (weight, indices): the rows looked up
            self.add("elem", name, _nbytes([args[1], out]) + out.numel() * out.element_size())
        else:
            self.add("elem", name, _nbytes(tree_leaves((args, kwargs, out))))
        return out


def _fused_rms_norm(mode: Traffic):
    """``F.rms_norm`` for the block, counted as CUDA's fused kernel (module docstring)."""
    rms_norm = F.rms_norm

    class FusedRMSNorm(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, eps):
            mode.paused += 1
            try:
                y = rms_norm(x, (x.shape[-1],), eps=eps)
            finally:
                mode.paused -= 1
            ctx.save_for_backward(x)
            ctx.eps = eps
            mode.add("elem", "fused_rms_norm", 2 * _nbytes([x]) + 4 * (x.numel() // x.shape[-1]))
            return y

        @staticmethod
        def backward(ctx, dy):
            (x,) = ctx.saved_tensors
            mode.paused += 1
            try:
                with torch.enable_grad():
                    xx = x.detach().requires_grad_()
                    (dx,) = torch.autograd.grad(rms_norm(xx, (x.shape[-1],), eps=ctx.eps), xx, dy)
            finally:
                mode.paused -= 1
            mode.add("elem", "fused_rms_norm_backward", 3 * _nbytes([x]) + 4 * (x.numel() // x.shape[-1]))
            return dx, None

    return lambda x, shape, eps=None: FusedRMSNorm.apply(x, eps)


def count_step(*, layers: int, tokens: int, dim: int, heads: int, kv_heads: int, ffn: int, vocab: int,
               regime: str, recompute: str = "none") -> Traffic:
    """One sequence of ``tokens`` through a ``layers``-block model, forward, loss (as the trainer) and
    backward, in the engine's ``regime``: "fp32" (CPU), "bf16" (FSDP2's bf16 parameters) or
    "autocast" (fp32 weights, bf16 autocast: the engine without FSDP on a GPU)."""
    args = ModelArgs(dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads, ffn_hidden=ffn,
                     vocab_size=vocab, max_seq_len=tokens)
    with torch.device("meta"):
        model = Transformer(args)
    init_weights(model, 0, torch.device("cpu"))
    model.to(torch.bfloat16 if regime == "bf16" else torch.float32)
    apply_recompute(list(model.layers.values()), recompute)
    batch = torch.randint(0, vocab, (1, tokens + 1), generator=torch.Generator().manual_seed(0))
    mode = Traffic()
    rms_norm = llama.F.rms_norm
    llama.F.rms_norm = _fused_rms_norm(mode)
    try:
        with mode:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=regime == "autocast"):
                logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
            loss.backward()
    finally:
        llama.F.rms_norm = rms_norm
    return mode
