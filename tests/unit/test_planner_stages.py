"""Planner memory per pipeline stage: the engine's layer split, both ends priced, the larger returned."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from apogee.models.flavors import ModelArgs, get_flavor
from apogee.models.llama import Transformer
from apogee.parallel.pipeline import split_layers, split_model
from apogee.planner.cluster import GIB, Cluster, get_accelerator
from apogee.planner.errors import PlannerError
from apogee.planner.estimate import estimate, rank_layer_counts
from apogee.planner.memory import (
    activation_bytes_per_layer,
    in_flight_microbatches,
    memory_per_gpu,
    stage_layer_counts,
    stage_memory,
    stage_params,
)
from apogee.planner.spec import Layout, ModelShape, run_from_dict, shape_from_args, shape_from_flavor

H100 = Cluster(accel=get_accelerator("h100-80gb"), gpus=8, gpus_per_node=8)


# -- the split agrees with the engine's ----------------------------------------------------------------
@pytest.mark.parametrize("flavor,seq", [("llama-1b", 2048), ("llama-1b", 8192), ("llama3-8b", 8192),
                                        ("llama3-70b", 8192), ("debug", 512)])
@pytest.mark.parametrize("pp,v", [(2, 1), (3, 1), (4, 1), (2, 2), (4, 2), (3, 3)])
def test_stage_split_is_the_engines(flavor, seq, pp, v):
    args = get_flavor(flavor)
    args = args if args.vocab_size else args.with_vocab(32000)
    if pp * v > args.n_layers:
        pytest.skip("more stages than layers")
    lay = Layout(pp=pp, virtual_stages=v, pp_schedule="interleaved-1f1b" if v > 1 else "1f1b")
    engine = [len(r) for r in split_layers(args, pp * v, seq)]
    assert stage_layer_counts(shape_from_flavor(flavor, seq_len=seq, vocab=args.vocab_size), lay) == engine


def test_llama_1b_split_is_uneven():
    # The 128256 x 2048 output projection costs ~3.8 layers at seq 2048: 16 layers over 4 stages go
    # 5, 5, 5, 1 (not ceil(16/4) = 4 everywhere, which the planner used to assume).
    assert stage_layer_counts(shape_from_flavor("llama-1b", seq_len=2048), Layout(pp=4)) == [5, 5, 5, 1]


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("pp,v", [(2, 1), (4, 1), (2, 2)])
def test_stage_params_count_the_engines_modules(tie, pp, v):
    # One pp rank's parameters, as split_model leaves them (meta device), against stage_params at tp=1.
    args = ModelArgs(dim=64, n_layers=8, n_heads=4, n_kv_heads=2, ffn_hidden=192, vocab_size=4096,
                     max_seq_len=64, tie_embeddings=tie)
    m = shape_from_args(args, seq_len=64)
    schedule = "interleaved-1f1b" if v > 1 else "1f1b"
    lay = Layout(pp=pp, virtual_stages=v, pp_schedule=schedule)
    for stage, pp_rank in (("first", 0), ("last", pp - 1)):
        with torch.device("meta"):
            model = Transformer(args)
        union, _ = split_model(model, pp_rank=pp_rank, pp=pp, schedule=schedule, per_rank=v, seq_len=64)
        engine = sum(p.numel() for p in union.parameters())  # a tied weight is one parameter: counted once
        nonexpert, experts = stage_params(m, lay, stage)
        assert (nonexpert, experts) == (engine, 0)


# -- memory of the most loaded stage, by hand ------------------------------------------------------------
S, HID, V, FFN = 2048, 1024, 256_000, 4096
PER_LAYER = 4 * HID * HID + 3 * HID * FFN + 2 * HID  # wq wk wv wo, w1 w2 w3, two RMSNorm gains
EMB = V * HID  # 262,144,000: worth 12.5 layers of compute, so the last stage gets one layer
# What the loss' stage keeps per micro-batch beyond its blocks (bf16): the fp32 log-softmax, 4sv, and
# the final RMSNorm's fp32 input, normalised and scaled outputs (4 + 2 + 2 bytes) and reciprocal RMS.
HEAD = 4 * S * V + S * (8 * HID + 4)
# The transient at the start of the loss' backward on the output stage: 8 bytes per logit (measured on an
# H100); it and the layer being recomputed under full recompute do not overlap: the larger counts.
LOSS_BWD = 8 * S * V


def _shape(tie: bool) -> ModelShape:
    return ModelShape(layers=8, hidden=HID, heads=8, kv_heads=8, ffn_hidden=FFN, vocab=V, seq_len=S,
                      tie_embeddings=tie)


def _hand(params: float, acts: float):
    # Zero 2 over dp = 2 (FSDP2, bf16 weights gathered, fp32 shards): 16 bytes of state per parameter
    # sharded in two (2 + 2 + 12 over 2), plus the whole stage's gathered bf16 weights (2), kept from forward
    # to backward; several micro-batches reduced once a step (torch's pipeline schedule, or grad_reduce =
    # "step") leave the gradients whole in fp32 (4) instead of sharded; the 2.5 GiB reserve only (no
    # separate in-flight gathers: they are among the kept weights).
    return {"params": params + 2 * params, "grads": 4 * params, "optimizer": 6 * params, "activations": acts,
            "buffers": 2.5 * GIB}


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("pp,split", [(2, (7, 1)), (4, (3, 2, 2, 1))])
def test_last_stage_with_a_large_vocab_is_the_most_loaded(tie, pp, split):
    m = _shape(tie)
    lay = Layout(pp=pp, dp=2, pp_schedule="1f1b", recompute="full", zero=2)
    gb = 16  # 8 micro-batches of one sequence on each data rank
    assert stage_layer_counts(m, lay) == list(split)
    recomputed = activation_bytes_per_layer(m, Layout(recompute="none"), micro_tokens=S)  # one full layer
    first_params = split[0] * PER_LAYER + EMB
    # Untied: the output layer; tied: the last stage's copy of the embedding. The same vocab x hidden
    # either way, plus the final norm.
    last_params = split[-1] * PER_LAYER + EMB + HID
    # Full recompute stores each layer's input (2sh) for every micro-batch in flight: pp on the first
    # stage under 1F1B, 1 on the last; the last also keeps one micro-batch's HEAD. (The embedding
    # output is the first layer's input: counted there.)
    first_acts = 2 * S * HID * split[0] * pp + recomputed
    last_acts = 2 * S * HID * split[-1] * 1 + max(recomputed, LOSS_BWD) + HEAD
    first = stage_memory(m, lay, H100, global_batch=gb, stage="first")
    last = stage_memory(m, lay, H100, global_batch=gb, stage="last")
    assert dataclasses.asdict(first) == pytest.approx(_hand(first_params, first_acts), rel=1e-12)
    assert dataclasses.asdict(last) == pytest.approx(_hand(last_params, last_acts), rel=1e-12)
    assert last.total > first.total
    assert memory_per_gpu(m, lay, H100, global_batch=gb) == last


def test_gpipe_last_stage_holds_every_micro_batchs_logits():
    m = _shape(False)
    lay = Layout(pp=2, dp=2, pp_schedule="gpipe", recompute="full", zero=2)
    recomputed = activation_bytes_per_layer(m, Layout(recompute="none"), micro_tokens=S)
    last = stage_memory(m, lay, H100, global_batch=16, stage="last")
    assert last.activations == pytest.approx(2 * S * HID * 1 * 8 + max(recomputed, LOSS_BWD) + 8 * HEAD, rel=1e-12)


def test_first_stage_wins_with_a_small_vocab():
    # A 32000 vocabulary: the first stage (more layers, pp micro-batches in flight) is the larger.
    m = dataclasses.replace(_shape(False), vocab=32000)
    lay = Layout(pp=2, pp_schedule="1f1b", recompute="none", zero=3)
    first = stage_memory(m, lay, H100, global_batch=8, stage="first")
    last = stage_memory(m, lay, H100, global_batch=8, stage="last")
    assert first.total > last.total
    assert memory_per_gpu(m, lay, H100, global_batch=8) == first


def test_in_flight_microbatches_per_end():
    # torch's interleaved 1F1B: rank r runs (v-1)p + 2(p-1-r) warm-up chunk forwards before its first
    # backward, so in units of its whole layer set the first rank holds (vp + p - 1)/v, the last ((v-1)p + 1)/v.
    inter = Layout(pp=4, virtual_stages=2, pp_schedule="interleaved-1f1b")
    assert in_flight_microbatches(inter, 16, "first") == pytest.approx((2 * 4 + 4 - 1) / 2)
    assert in_flight_microbatches(inter, 16, "last") == pytest.approx((1 * 4 + 1) / 2)
    assert in_flight_microbatches(Layout(pp=4), 16, "first") == 4
    assert in_flight_microbatches(Layout(pp=4), 16, "last") == 1
    assert in_flight_microbatches(Layout(pp=4, pp_schedule="gpipe"), 16, "last") == 16


# -- pp = 1 ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [False, True])
def test_single_stage_memory_by_hand(tie):
    # The whole model on one stage: parameters without the final norm's gain, the output layer only
    # when untied; activations of every layer and one micro-batch's HEAD.
    m = _shape(tie)
    # Zero 2: every block keeps its gathered weights; one gradient reduction a step: whole gradients.
    lay = Layout(dp=2, recompute="full", zero=2, grad_reduce="step")
    recomputed = activation_bytes_per_layer(m, Layout(recompute="none"), micro_tokens=S)
    params = 8 * PER_LAYER + EMB + (0 if tie else EMB)
    acts = 2 * S * HID * 8 + max(recomputed, LOSS_BWD) + HEAD
    got = memory_per_gpu(m, lay, H100, global_batch=16)
    assert dataclasses.asdict(got) == pytest.approx(_hand(params, acts), rel=1e-12)
    assert got == stage_memory(m, lay, H100, global_batch=16, stage="first")


# -- step time: each pp rank's own blocks ------------------------------------------------------------
def _timed(flavor: str, stack: str, layers: int | None = None, **layout):
    model = {"flavor": flavor} if layers is None else {**_shape_keys(flavor), "layers": layers}
    run = run_from_dict({"model": model, "cluster": {"gpu": "h100-80gb", "gpus": 128},
                         "train": {"global_batch": 64, "stack": stack}})
    lay = Layout(**layout)
    return rank_layer_counts(run, lay), estimate(run, lay)


def _shape_keys(flavor: str) -> dict:
    s = shape_from_flavor(flavor)
    return {k: getattr(s, k) for k in ("hidden", "heads", "kv_heads", "ffn_hidden", "vocab", "seq_len")}


def test_step_time_takes_each_ranks_blocks_from_the_engines_split():
    lay = dict(tp=8, pp=4, dp=4, microbatch=1, virtual_stages=2, pp_schedule="interleaved-1f1b",
               sequence_parallel=True, zero=3)
    counts, _ = _timed("llama3-70b", "apogee", **lay)
    stages = stage_layer_counts(shape_from_flavor("llama3-70b"), Layout(**lay))
    assert counts == [sum(stages[r::4]) for r in range(4)] and sum(counts) == 80
    assert counts != [20] * 4  # the output layer moves blocks off the last rank
    # Megatron-LM splits evenly where the stages divide the layers (the published runs' split).
    assert _timed("llama3-70b", "megatron", **lay)[0] == [20] * 4


def test_memory_holds_the_blocks_the_stacks_split_gives_each_stage():
    """Memory and step time read one split per stack: Megatron's even one leaves the last stage its
    20 blocks plus the output layer, where apogee's balance moves blocks off it."""
    lay = Layout(tp=8, pp=4, dp=4, microbatch=1, virtual_stages=2, pp_schedule="interleaved-1f1b",
                 sequence_parallel=True, zero=3)
    m = shape_from_flavor("llama3-70b")
    assert stage_layer_counts(m, lay, "megatron") == [10] * 8
    cluster = dataclasses.replace(H100, gpus=128)
    last = {stack: stage_memory(m, lay, cluster, global_batch=64, stage="last", stack=stack)
            for stack in ("apogee", "megatron")}
    apogee_blocks = sum(stage_layer_counts(m, lay)[3::4])
    assert apogee_blocks < 20
    # The last stage's parameters: the same output layer, 20 - apogee_blocks more blocks under megatron.
    per_block = (m.attn_params() + m.norm_params() + m.dense_mlp_params()) / lay.tp
    extra = stage_params(m, lay, "last", "megatron")[0] - stage_params(m, lay, "last")[0]
    assert extra == pytest.approx((20 - apogee_blocks) * per_block, rel=1e-9)
    # FSDP over dp = 4 in both. (apogee's pipeline schedule would keep more than two gathered blocks, but
    # here the micro-batch of activations a backward frees outweighs the stage's weights: test_planner_zero.)
    own = stage_params(m, lay, "last")[0]
    assert last["megatron"].params == pytest.approx(2 * (own + extra) / 4, rel=1e-9)
    assert last["apogee"].params == pytest.approx(2 * own / 4, rel=1e-9)
    assert _timed("llama3-70b", "megatron", **dataclasses.asdict(lay))[0] == [20] * 4


def test_a_pipeline_that_does_not_divide_the_layers_is_priced_between_its_neighbours():
    # Llama 3 405B's 126 layers on 16 stages (Dubey et al. 2024): no longer rejected.
    lay = dict(tp=8, pp=16, dp=1, microbatch=1, pp_schedule="1f1b", sequence_parallel=True, zero=1)
    counts, uneven = _timed("llama3-405b", "megatron", **lay)
    assert sum(counts) == 126 and max(counts) == 8 and min(counts) < 8
    _, fewer = _timed("llama3-405b", "megatron", layers=112, **lay)  # 7 a stage
    _, more = _timed("llama3-405b", "megatron", layers=128, **lay)  # 8 a stage
    assert fewer.step_time_s < uneven.step_time_s < more.step_time_s
    with pytest.raises(PlannerError, match="layout.pp x layout.virtual_stages = 128 pipeline stages"):
        _timed("llama3-405b", "megatron", **{**lay, "pp": 128, "tp": 1})


def test_search_considers_power_of_two_pipelines_that_do_not_divide_the_layers():
    from apogee.planner.search import candidate_values

    def pp(gpus):
        run = run_from_dict({"model": {"flavor": "llama3-405b"}, "cluster": {"gpu": "h100-80gb", "gpus": gpus}})
        return candidate_values(run)["pp"]

    assert pp(8192) == [1, 2, 4, 8, 16, 32, 64]  # 126 layers: only 1 and 2 divide both
    assert pp(1344) == [1, 2, 3, 4, 6, 7, 8, 14, 16, 21, 32, 42, 64]  # 1344 = 2^6 x 3 x 7


def test_megatron_embedding_and_loss_aware_split():
    """layout.pp_split = "embedding_loss" (Megatron-LM's --account-for-embedding-in-pipeline-split and
    --account-for-loss-in-pipeline-split; Llama 3 405B's published split): layers + 2 slots in even chunks,
    the embedding and the loss taking one each. 126 layers on pp 16 x 8 virtual stages: one layer a chunk,
    the first chunk the embedding alone, the last the loss alone; the first and last ranks hold 7 layers,
    the others 8."""
    from apogee.planner.cluster import Cluster, get_accelerator
    from apogee.planner.estimate import check_layout
    from apogee.planner.memory import rank_layer_ranges, stage_layer_counts
    from apogee.planner.spec import Layout, shape_from_flavor

    m = shape_from_flavor("llama3-405b", seq_len=8192)
    assert m.layers == 126
    lay = Layout(tp=8, pp=16, dp=64, microbatch=1, pp_schedule="interleaved-1f1b", virtual_stages=8,
                 pp_split="embedding_loss", zero=2)
    counts = stage_layer_counts(m, lay, "megatron")
    assert counts == [0] + [1] * 126 + [0]
    held = [sum(len(r) for r in rank_layer_ranges(m, lay, s, "megatron")) for s in ("first", "last")]
    assert held == [7, 7] and sum(counts[1::16]) == 8  # a middle rank: chunks 1, 17, ..., 113
    four = stage_layer_counts(m, Layout(pp=16, virtual_stages=4, pp_split="embedding_loss"), "megatron")
    assert four[0] == four[-1] == 1 and set(four[1:-1]) == {2} and sum(four) == 126
    cluster = Cluster(accel=get_accelerator("h100-80gb"), gpus=8192, gpus_per_node=8)
    assert check_layout(m, lay, cluster, 2048, "megatron") is None
    assert "Megatron-LM's" in check_layout(m, lay, cluster, 2048, "apogee")
    odd = Layout(tp=8, pp=16, dp=64, microbatch=1, pp_schedule="interleaved-1f1b", virtual_stages=3,
                 pp_split="embedding_loss", zero=2)
    assert "divisible" in check_layout(m, odd, cluster, 2048, "megatron")
