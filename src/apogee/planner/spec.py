"""Run descriptions: the model shape, the (partial) layout and the batch the planner is asked about.

A run description is a TOML file (or the same dict built from flags) with ``[model]``, ``[cluster]``,
``[layout]`` and ``[train]`` tables. Layout keys left out are searched by ``plan``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from apogee.models.flavors import FLAVORS, ModelArgs
from apogee.planner.cluster import Cluster, cluster_from_dict, load_toml
from apogee.planner.errors import PlannerError


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn_hidden: int
    vocab: int
    seq_len: int
    mlp: str = "swiglu"  # "swiglu" (3 matrices, Llama) or "gelu" (2 matrices, GPT)
    attention: str = "flash"  # "flash" (no s^2 scores stored, causal half) or "eager" (GPT 2021)
    tie_embeddings: bool = False
    experts: int = 0
    top_k: int = 0
    shared_experts: int = 0
    moe_ffn_hidden: int = 0
    dense_layers: int = 0
    # Fused Q/K/V and gate/up GEMMs (Megatron-LM) or separate ones (apogee's Llama: wq, wk, wv and w1,
    # w3): same FLOPs, other shapes.
    fused_gemms: bool = True
    flavor: str | None = None
    # Width of one attention head (Megatron-LM's --kv-channels). 0: hidden / heads. Qwen3 sets it apart
    # from the hidden size (235B-A22B: 64 heads of 128 on a hidden of 4096), so its query and attention
    # output are heads x head_dim wide (``q_dim``), not hidden. Filled in at construction, so
    # ``dataclasses.replace`` of hidden or heads keeps it unless given head_dim=0 again.
    head_dim: int = 0

    def __post_init__(self) -> None:
        for k in ("layers", "hidden", "heads", "kv_heads", "ffn_hidden", "vocab", "seq_len"):
            if getattr(self, k) <= 0:
                raise PlannerError(f"model.{k} must be a positive integer (got {getattr(self, k)})")
        if self.head_dim < 0:
            raise PlannerError(f"model.head_dim must be a positive integer (got {self.head_dim})")
        if not self.head_dim:
            if self.hidden % self.heads:
                raise PlannerError(f"model.hidden={self.hidden} is not divisible by model.heads={self.heads} "
                                   "(set model.head_dim where the heads are not hidden / heads wide)")
            object.__setattr__(self, "head_dim", self.hidden // self.heads)
        if self.heads % self.kv_heads:
            raise PlannerError(f"model.heads={self.heads} is not divisible by model.kv_heads={self.kv_heads}")
        if self.mlp not in ("swiglu", "gelu"):
            raise PlannerError(f"model.mlp must be \"swiglu\" or \"gelu\" (got {self.mlp!r})")
        if self.attention not in ("flash", "eager"):
            raise PlannerError(f"model.attention must be \"flash\" or \"eager\" (got {self.attention!r})")
        if self.experts and not (0 < self.top_k <= self.experts and self.moe_ffn_hidden > 0):
            raise PlannerError("an MoE model needs 0 < model.top_k <= model.experts and model.moe_ffn_hidden > 0")

    # -- parameter counts ---------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        """Width of the queries and of the attention output (the output projection's input)."""
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def mlp_mats(self) -> int:
        return 3 if self.mlp == "swiglu" else 2

    @property
    def moe_layers(self) -> int:
        return self.layers - self.dense_layers if self.experts else 0

    def attn_params(self) -> int:
        h = self.hidden
        w = 2 * h * self.q_dim + 2 * h * self.kv_dim
        return w + (4 * h if self.mlp == "gelu" else 0)  # GPT: qkv and out-proj biases (Narayanan Eq.2)

    def norm_params(self) -> int:
        return 4 * self.hidden if self.mlp == "gelu" else 2 * self.hidden  # LayerNorm has a bias

    def dense_mlp_params(self) -> int:
        w = self.mlp_mats * self.hidden * self.ffn_hidden
        return w + (self.ffn_hidden + self.hidden if self.mlp == "gelu" else 0)

    def expert_params(self) -> int:
        """Parameters of one routed expert."""
        return self.mlp_mats * self.hidden * self.moe_ffn_hidden

    def moe_layer_mlp_params(self) -> tuple[int, int]:
        """(non-expert params: router + shared experts, routed-expert params) of one MoE layer."""
        shared = self.shared_experts * self.expert_params() + self.hidden * self.experts
        return shared, self.experts * self.expert_params()

    def embedding_params(self) -> int:
        return self.vocab * self.hidden + (self.seq_len * self.hidden if self.mlp == "gelu" else 0)

    def output_params(self) -> int:
        return 0 if self.tie_embeddings else self.vocab * self.hidden

    def num_params(self) -> int:
        dense_layers = self.layers - self.moe_layers
        body = dense_layers * (self.attn_params() + self.norm_params() + self.dense_mlp_params())
        if self.moe_layers:
            shared, routed = self.moe_layer_mlp_params()
            body += self.moe_layers * (self.attn_params() + self.norm_params() + shared + routed)
        final_norm = 2 * self.hidden if self.mlp == "gelu" else self.hidden
        return body + final_norm + self.embedding_params() + self.output_params()

    def active_params(self) -> int:
        """Parameters one token touches (MoE: top_k routed experts)."""
        if not self.moe_layers:
            return self.num_params()
        _, routed = self.moe_layer_mlp_params()
        return self.num_params() - self.moe_layers * (routed - self.top_k * self.expert_params())

    # -- FLOPs -------------------------------------------------------------------------------
    def matmul_flops_per_token(self) -> float:
        """Forward matmul FLOPs per token, excluding attention scores (2 per weight per token)."""
        h, L = self.hidden, self.layers
        attn = 2 * (2 * h * self.q_dim + 2 * h * self.kv_dim)
        dense_mlp = 2 * self.mlp_mats * h * self.ffn_hidden
        moe_mlp = 2 * (self.top_k + self.shared_experts) * self.expert_params() + 2 * h * self.experts
        per_layer = (L - self.moe_layers) * (attn + dense_mlp) + self.moe_layers * (attn + moe_mlp)
        return per_layer + 2 * h * self.vocab

    def attn_flops_per_token(self, *, causal_half: bool = False) -> float:
        """Forward QK^T and AV FLOPs per token (full s^2 unless ``causal_half``)."""
        f = 4.0 * self.layers * self.seq_len * self.q_dim
        return f / 2 if causal_half else f

    def model_flops_per_token(self) -> float:
        """Training FLOPs per token, no recompute (MFU basis): 3x forward, attention counted full
        (Megatron-LM's num_floating_point_operations; Korthikanti 2022 Appendix A)."""
        return 3.0 * (self.matmul_flops_per_token() + self.attn_flops_per_token())


def shape_from_flavor(name: str, *, seq_len: int | None = None, vocab: int | None = None) -> ModelShape:
    if name not in FLAVORS:
        raise PlannerError(f"unknown model.flavor {name!r}; choose one of: {', '.join(sorted(FLAVORS))}")
    return shape_from_args(FLAVORS[name], flavor=name, seq_len=seq_len, vocab=vocab)


def shape_from_args(m: ModelArgs, *, flavor: str | None = None, seq_len: int | None = None,
                    vocab: int | None = None) -> ModelShape:
    return ModelShape(
        layers=m.n_layers, hidden=m.dim, heads=m.n_heads, kv_heads=m.n_kv_heads, ffn_hidden=m.ffn_hidden,
        vocab=vocab or m.vocab_size or 32000, seq_len=seq_len or m.max_seq_len, tie_embeddings=m.tie_embeddings,
        experts=m.experts, top_k=m.top_k, shared_experts=m.shared_experts, moe_ffn_hidden=m.moe_ffn_hidden,
        dense_layers=m.dense_layers, fused_gemms=False, flavor=flavor,
    )


_MODEL_KEYS = {"flavor", "layers", "hidden", "heads", "kv_heads", "ffn_hidden", "vocab", "seq_len", "experts",
               "top_k", "shared_experts", "moe_ffn_hidden", "dense_layers", "mlp", "attention", "tie_embeddings",
               "head_dim"}


def model_from_dict(d: dict) -> ModelShape:
    unknown = set(d) - _MODEL_KEYS
    if unknown:
        raise PlannerError(f"unknown key model.{sorted(unknown)[0]}; known: {', '.join(sorted(_MODEL_KEYS))}")
    d = dict(d)
    if "flavor" in d:
        base = shape_from_flavor(str(d.pop("flavor")))
        try:
            # head_dim 0 re-derives it from the overrides' hidden / heads (a flavor's heads are that wide).
            return dataclasses.replace(base, **{"head_dim": 0, **d})
        except TypeError as e:
            raise PlannerError(f"[model]: {e}") from None
    missing = [k for k in ("layers", "hidden", "heads", "vocab", "seq_len") if k not in d]
    if missing:
        raise PlannerError(f"[model] needs flavor = \"...\" or model.{missing[0]} (missing: {', '.join(missing)})")
    d.setdefault("kv_heads", d["heads"])
    if "ffn_hidden" not in d:
        # GPT convention (Narayanan 2021): 4h with a 2-matrix GeLU MLP; SwiGLU: Llama's 8h/3 rounding.
        mlp = d.get("mlp", "swiglu")
        h = d["hidden"]
        d["ffn_hidden"] = 4 * h if mlp == "gelu" else 256 * ((int(8 * h / 3) + 255) // 256)
    return ModelShape(**d)


# -- layout ----------------------------------------------------------------------------------
SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zero-bubble")
GRAD_REDUCE = ("micro_batch", "step")  # apogee's parallel.grad_reduce
RECOMPUTE = ("none", "selective", "full")
# How a Megatron-LM pipeline splits the layers: "even" (its default), or "embedding_loss" (its
# --account-for-embedding-in-pipeline-split and --account-for-loss-in-pipeline-split: the embedding and
# the loss each take a layer's slot, in the first stage's first chunk and the last stage's last).
PP_SPLITS = ("even", "embedding_loss")
# How context parallelism moves K and V: "p2p", a ring of exchanges overlapped with attention (Megatron-LM's
# default --cp-comm-type), or "all_gather" before attention, on the critical path (apogee's engine,
# apogee.parallel.context; Llama 3's). Left empty, the stack's own.
CP_COMMS = ("p2p", "all_gather")
EP_DISPATCH = ("all_to_all", "deepep")
ZERO = (0, 1, 2, 3)  # "fsdp" is accepted as 3


@dataclass(frozen=True, kw_only=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    ep: int = 1
    microbatch: int = 1
    virtual_stages: int = 1
    pp_schedule: str = "1f1b"
    recompute: str = "none"
    sequence_parallel: bool = False
    zero: int = 3
    # HSDP (apogee's parallel.dp_replicate with dp_shard): the dp ranks form dp_replicate replicas, each
    # sharding the model state (zero 2 or 3) over its dp / dp_replicate ranks x cp; gradients are
    # all-reduced across the replicas once a step. 1: one replica (plain FSDP over dp x cp).
    dp_replicate: int = 1
    pp_split: str = "even"  # Megatron-LM's layer split (PP_SPLITS); taken as given, never searched
    cp_comm: str = ""  # CP_COMMS, "" for the stack's own (apogee: all_gather, megatron: p2p); never searched
    # apogee's parallel.grad_reduce under FSDP with several micro-batches (pp = 1): "micro_batch" reduces each
    # micro-batch's gradients (sharded accumulation), "step" once after the last (whole fp32 gradients).
    grad_reduce: str = "micro_batch"
    # Overlap of the data-parallel reduction with backward, and of TP collectives with GEMMs
    # (Megatron-LM --overlap-grad-reduce / --tp-comm-overlap; FSDP2 prefetching / async TP).
    dp_overlap: bool = True
    tp_overlap: bool = False
    # apogee's train.compile (per-block torch.compile): the block's elementwise ops fuse. Taken as given,
    # never searched (the engine's default is eager).
    compile: bool = False
    # How many ways each routed expert's matrices are split (Megatron-LM's --expert-tensor-parallel-size).
    # 0: like the rest of the block, tp ways, the experts sharded over the data and context ranks alone.
    # Smaller (1 in Megatron's MoE recipes) folds the expert-parallel groups over the tensor ranks too
    # (MoE parallel folding, Liu et al. 2025): ep x expert_tp ranks out of a stage's tp x dp x cp. Left out,
    # the search tries 0 and 1 (search._expert_values).
    expert_tp: int = 0
    # How tokens reach their experts (EP_DISPATCH): "all_to_all", one copy per routed expert (Megatron-LM's
    # alltoall dispatcher), or "deepep", once per node and rank holding any of them (DeepEP, Megatron's flex
    # dispatcher). Taken as given, never searched.
    ep_dispatch: str = "all_to_all"

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    @property
    def etp(self) -> int:
        """Ways each routed expert is split (``expert_tp``, or tp where it is not set)."""
        return self.expert_tp or self.tp

    @property
    def expert_dp(self) -> int:
        """Replicas of each expert shard within a pipeline stage (Megatron's expert data parallelism): the
        ranks that reduce an expert's gradients and shard its optimizer state."""
        return max(1, self.tp * self.dp * self.cp // (self.ep * self.etp))

    @property
    def shard_group(self) -> int:
        """The ranks the model state is sharded over: dp x cp, or one replica's under HSDP."""
        return self.dp // self.dp_replicate * self.cp

    def short(self) -> str:
        s = f"tp{self.tp} pp{self.pp} dp{self.dp}"
        if self.cp > 1:
            s += f" cp{self.cp}"
        if self.ep > 1:
            s += f" ep{self.ep}"
        if self.expert_tp and self.expert_tp != self.tp:
            s += f" etp{self.expert_tp}"
        if self.ep_dispatch != "all_to_all":
            s += f" {self.ep_dispatch}"
        s += f" mb{self.microbatch}"
        if self.pp > 1:
            s += f" {self.pp_schedule}" + (f"x{self.virtual_stages}" if self.virtual_stages > 1 else "")
        s += f" rc:{self.recompute}" + (" sp" if self.sequence_parallel else "") + f" z{self.zero}"
        s += f" hsdp{self.dp_replicate}" if self.dp_replicate > 1 else ""
        s += " split:embedding_loss" if self.pp_split == "embedding_loss" else ""
        s += f" cp:{self.cp_comm}" if self.cp_comm and self.cp > 1 else ""
        s += " reduce/step" if self.grad_reduce == "step" else ""
        return s + (" compiled" if self.compile else "")


LAYOUT_KEYS = {f.name for f in dataclasses.fields(Layout)}


def normalize_layout_dict(d: dict, *, where: str = "[layout]") -> dict:
    """Check and normalise a partial layout table; returns only the keys that were given."""
    unknown = set(d) - LAYOUT_KEYS
    if unknown:
        raise PlannerError(f"unknown key layout.{sorted(unknown)[0]}; known: {', '.join(sorted(LAYOUT_KEYS))}")
    out = dict(d)
    for k in ("tp", "pp", "dp", "cp", "ep", "microbatch", "virtual_stages", "dp_replicate", "expert_tp"):
        if k in out and (not isinstance(out[k], int) or isinstance(out[k], bool) or out[k] < 1):
            raise PlannerError(f"layout.{k} must be a positive integer (got {out[k]!r})")
    if "zero" in out:
        z = out["zero"]
        if isinstance(z, str) and z.lower() == "fsdp":
            z = 3
        if z not in ZERO or isinstance(z, bool):
            raise PlannerError(f"layout.zero must be 0, 1, 2, 3 or \"fsdp\" (got {out['zero']!r})")
        out["zero"] = z
    if "grad_reduce" in out and out["grad_reduce"] not in GRAD_REDUCE:
        raise PlannerError(f"layout.grad_reduce must be one of {', '.join(GRAD_REDUCE)} (got {out['grad_reduce']!r})")
    if "cp_comm" in out and out["cp_comm"] not in CP_COMMS:
        raise PlannerError(f"layout.cp_comm must be one of {', '.join(CP_COMMS)} (got {out['cp_comm']!r})")
    if "ep_dispatch" in out and out["ep_dispatch"] not in EP_DISPATCH:
        raise PlannerError(f"layout.ep_dispatch must be one of {', '.join(EP_DISPATCH)} (got {out['ep_dispatch']!r})")
    if "pp_split" in out and out["pp_split"] not in PP_SPLITS:
        raise PlannerError(f"layout.pp_split must be one of {', '.join(PP_SPLITS)} (got {out['pp_split']!r})")
    if "pp_schedule" in out and out["pp_schedule"] not in SCHEDULES:
        raise PlannerError(f"layout.pp_schedule must be one of {', '.join(SCHEDULES)} (got {out['pp_schedule']!r})")
    if "recompute" in out and out["recompute"] not in RECOMPUTE:
        raise PlannerError(f"layout.recompute must be one of {', '.join(RECOMPUTE)} (got {out['recompute']!r})")
    for k in ("sequence_parallel", "dp_overlap", "tp_overlap", "compile"):
        if k in out and not isinstance(out[k], bool):
            raise PlannerError(f"layout.{k} must be true or false (got {out[k]!r})")
    return out


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    model: ModelShape
    cluster: Cluster
    fixed: dict  # layout keys the user pinned
    global_batch: int  # sequences per optimizer step
    precision: str = "bf16"
    checkpoint_gb: float | None = None  # size of one checkpoint; None: 14 bytes/param (bf16 weights + fp32 Adam)
    # The software the run is priced for: "apogee" (this engine: eager PyTorch blocks unless
    # layout.compile, cuBLAS at the accelerator's engine_gemm_eff) or "megatron" (Megatron-LM with
    # fused kernels, at the gemm_eff calibrated on its published runs).
    stack: str = "apogee"


STACKS = ("apogee", "megatron")


def stack_refusal(m: ModelShape, stack: str) -> str | None:
    """Why ``stack`` cannot run this model at all (one line naming the keys), or None."""
    if stack == "apogee" and m.experts:
        return (f"model.experts={m.experts}: apogee's engine has no mixture-of-experts layers yet; "
                "train.stack = \"megatron\" prices Megatron-LM's")
    return None


_TRAIN_KEYS = {"global_batch", "precision", "checkpoint_gb", "seq_len", "stack"}


def run_from_dict(d: dict, *, base_dir: Path | None = None) -> RunSpec:
    unknown = set(d) - {"model", "cluster", "layout", "train"}
    if unknown:
        raise PlannerError(f"unknown table [{sorted(unknown)[0]}]; a run description has [model], [cluster], [layout], [train]")
    if "model" not in d:
        raise PlannerError("the run description needs a [model] table (flavor = \"...\" or its shape)")
    if "cluster" not in d:
        raise PlannerError("the run description needs a [cluster] table (gpu, gpus, gpus_per_node, or file = ...)")
    train = dict(d.get("train", {}))
    bad = set(train) - _TRAIN_KEYS
    if bad:
        raise PlannerError(f"unknown key train.{sorted(bad)[0]}; known: {', '.join(sorted(_TRAIN_KEYS))}")
    model_d = dict(d["model"])
    if "seq_len" in train:
        model_d["seq_len"] = train["seq_len"]
    model = model_from_dict(model_d)
    cluster = cluster_from_dict(d["cluster"], base_dir=base_dir)
    fixed = normalize_layout_dict(d.get("layout", {}))
    gb = train.get("global_batch")
    if gb is None:
        # A sensible default: ~4M tokens (Llama 3's early batch), at least one sequence per GPU.
        gb = max(cluster.gpus, (4 * 1024 * 1024) // model.seq_len)
    if not isinstance(gb, int) or gb < 1:
        raise PlannerError(f"train.global_batch must be a positive integer of sequences (got {gb!r})")
    precision = train.get("precision", "bf16")
    if precision not in ("bf16", "fp8"):
        raise PlannerError(f"train.precision must be \"bf16\" or \"fp8\" (got {precision!r})")
    cluster.accel.peak(precision)  # rejects fp8 on accelerators without it
    stack = train.get("stack", "apogee")
    if stack not in STACKS:
        raise PlannerError(f"train.stack must be one of {', '.join(STACKS)} (got {stack!r})")
    why = stack_refusal(model, stack)
    if why:
        raise PlannerError(why)
    return RunSpec(model=model, cluster=cluster, fixed=fixed, global_batch=gb, precision=precision,
                   checkpoint_gb=train.get("checkpoint_gb"), stack=stack)


def load_run(path: str | Path) -> RunSpec:
    path = Path(path)
    return run_from_dict(load_toml(path), base_dir=path.parent)
