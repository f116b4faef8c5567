"""Tensor (+ sequence) parallelism for the dense Llama model, as DTensor plans.

Megatron's split: column-parallel in, row-parallel out, so each block needs one all-reduce forward
and one backward. With sequence parallelism the activations between blocks (norms, residual) stay
sharded along the sequence, turning each all-reduce into a reduce-scatter + all-gather pair and
dividing activation memory by tp. The output projection keeps logits sharded along the vocabulary
so the loss never gathers them (``loss_parallel``).
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from apogee.models.llama import Transformer


def apply_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh, *, sequence_parallel: bool, loss_parallel: bool) -> None:
    between_blocks = Shard(1) if sequence_parallel else Replicate()
    norm_style = SequenceParallel() if sequence_parallel else None
    logits_layout = Shard(-1) if loss_parallel else Replicate()

    top_plan = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=between_blocks),
        "output": ColwiseParallel(
            input_layouts=between_blocks, output_layouts=logits_layout, use_local_output=not loss_parallel
        ),
    }
    if norm_style is not None:
        top_plan["norm"] = norm_style
    # A pipeline stage lacks the embedding, or the norm and output, of the stages it does not own.
    top_plan = {name: style for name, style in top_plan.items() if getattr(model, name) is not None}
    if top_plan:
        parallelize_module(model, tp_mesh, top_plan)

    for block in model.layers.values():
        plan = {
            "attention": PrepareModuleInput(
                input_layouts=(between_blocks, None), desired_input_layouts=(Replicate(), None)
            ),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=between_blocks),
            "feed_forward": PrepareModuleInput(input_layouts=(between_blocks,), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=between_blocks),
        }
        if norm_style is not None:
            plan["attention_norm"] = norm_style
            plan["ffn_norm"] = norm_style
        parallelize_module(block, tp_mesh, plan)
    # Embedding (row-wise) and output (column-wise) both shard the [vocab, dim] weight on dim 0,
    # so a tied weight keeps one placement; the plans above created two parameters, re-tie them.
    model.tie_weights()
