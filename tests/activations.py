"""What apogee's model keeps for backward, measured: the bytes of every tensor storage an op created
during the forward and the loss that is still alive when the loss is known (what autograd, or the
recompute policy, holds for backward). Compared with the planner's activation formulas by
tests/unit/test_planner_activations.py and tests/distributed/test_planner_activations_tp.py."""

from __future__ import annotations

import contextlib
import statistics
import weakref

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel
from torch.utils._python_dispatch import TorchDispatchMode

from apogee.models.flavors import ModelArgs
from apogee.models.init import init_weights
from apogee.models.llama import Transformer
from apogee.parallel.context import apply_context_parallel, load_balanced_positions
from apogee.parallel.recompute import apply_recompute
from apogee.parallel.tensor import apply_tensor_parallel

# A small Llama block shape (GQA, SwiGLU) and a vocabulary larger than the hidden size.
DIM, HEADS, KV, FFN, SEQ, MB, VOCAB = 128, 4, 2, 384, 64, 2, 512
TOKENS = MB * SEQ


def _local(t: torch.Tensor) -> torch.Tensor:
    while isinstance(t, (DTensor, AsyncCollectiveTensor)):
        t = t._local_tensor if isinstance(t, DTensor) else t.elem
    return t


class LiveStorages(TorchDispatchMode):
    """Bytes of the storages created by ops under this mode that are still alive (this rank's
    shards for DTensors)."""

    def __init__(self, ignore: set[int]):
        super().__init__()
        self.ignore = ignore  # parameters and buffers: views of them are not new memory
        self.live: dict[int, int] = {}

    @property
    def bytes(self) -> int:
        return sum(self.live.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                storage = _local(t).untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.ignore and key not in self.live:
                    self.live[key] = storage.nbytes()
                    weakref.finalize(storage, self.live.pop, key, 0)
        return out


def _meta_model(layers: int) -> Transformer:
    """The test shape with ``layers`` blocks, on the meta device (to be parallelised, then materialised)."""
    args = ModelArgs(dim=DIM, n_layers=layers, n_heads=HEADS, n_kv_heads=KV, ffn_hidden=FFN, vocab_size=VOCAB,
                     max_seq_len=SEQ)
    with torch.device("meta"):
        return Transformer(args)


def held_after_forward(layers: int, *, dtype: torch.dtype = torch.float32, recompute: str = "none",
                       tp_mesh=None, sequence_parallel: bool = False, autocast: bool = False) -> int:
    """Bytes held for backward by a ``layers``-block model after forward + loss, on this rank.
    ``autocast``: fp32 weights, forward under bf16 autocast (the engine without FSDP on a GPU)."""
    model = _meta_model(layers)
    if tp_mesh is not None:
        apply_tensor_parallel(model, tp_mesh, sequence_parallel=sequence_parallel, loss_parallel=True)
    init_weights(model, 0, torch.device("cpu"))
    model.to(torch.float32 if autocast else dtype)  # bf16 parameters and activations: FSDP's param_dtype
    apply_recompute(list(model.layers.values()), recompute)
    tokens = torch.randint(0, VOCAB, (MB, SEQ + 1), generator=torch.Generator().manual_seed(0))
    mode = LiveStorages({_local(t).untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]})
    with loss_parallel() if tp_mesh is not None else contextlib.nullcontext():
        with mode:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):  # as the trainer: forward only
                logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())  # as the trainer
            del logits
            held = mode.bytes
        loss.backward()  # what was held is what backward needs: it runs
    return held


COUNTED_PASSES = 5


def saved_by_blocks(layers: int, *, compiled: bool = False, autocast: bool = False, cp_mesh=None) -> int:
    """Bytes the transformer blocks of a ``layers``-block model save for backward (autograd's saved-tensor
    hooks, parameters excluded, each storage once), fp32 weights, under bf16 autocast or in fp32;
    ``compiled``: each block compiled as the engine does (``block.compile()``). A dispatch mode does not
    see inside compiled code; the hooks see what its autograd function saves. The forwards after the
    first (which compiles) are counted, and the count most of them give is returned: under autocast with
    context parallelism a pass's count moves by 8-32 KiB now and then (not found why; about one CI run in
    five had failed on it). ``cp_mesh``: context parallelism as the trainer sets it up (the rank's
    load-balanced slice of each sequence, K and V all-gathered in every block)."""
    model = _meta_model(layers)
    if cp_mesh is not None:
        apply_context_parallel(model, cp_mesh)
    init_weights(model, 0, torch.device("cpu"))
    if compiled:
        for block in model.layers.values():
            block.compile()
    params = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    tokens = torch.randint(0, VOCAB, (MB, SEQ), generator=torch.Generator().manual_seed(0))
    if cp_mesh is not None:
        positions = load_balanced_positions(SEQ, cp_mesh.size(), cp_mesh.get_local_rank())
        model.rope = model.rope[:, positions]
        tokens = tokens[:, positions]
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    counts = []
    for _ in range(COUNTED_PASSES + 1):
        saved.clear()
        h = model.tok_embeddings(tokens).detach().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                for block in model.layers.values():
                    h = block(h, model.rope)
        h.float().sum().backward()
        counts.append(sum(saved.values()))
    return statistics.mode(counts[1:])


def _rank_main(rank: int, world: int, init_file: str, axis: str, measure, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    results[rank] = measure(init_device_mesh("cpu", (world,), mesh_dim_names=(axis,)))
    dist.destroy_process_group()


def measured_on_ranks(measure, world: int, axis: str, init_file: str) -> dict:
    """``measure(mesh)`` on each of ``world`` spawned gloo ranks, over a 1-D mesh named ``axis``; the
    results by rank. ``measure`` must be a module-level function (it is pickled to the ranks)."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank_main, args=(world, init_file, axis, measure, results), nprocs=world)
        return {rank: results[rank] for rank in range(world)}
