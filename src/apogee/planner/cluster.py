"""Accelerators and clusters: the hardware facts the planner's cost model reads.

Every built-in number cites where it comes from. Bandwidths are *effective bus bandwidths* (what
NCCL's ``busbw`` reports for large messages), because the cost model prices collectives with the
ring formulas that ``busbw`` is defined against.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path

from apogee.planner.errors import PlannerError

GIB = 1024**3


@dataclass(frozen=True, kw_only=True, eq=False)  # hashed by identity: the cost model caches on it
class Accelerator:
    name: str
    peak_tflops: dict[str, float]  # dense (no sparsity) peak per precision
    mem_gib: float
    mem_bw_gbs: float  # HBM bandwidth, GB/s
    # Fraction of peak an 8192^3 GEMM reaches on this accelerator's training stack (compute.GEMM_REF_SHAPE):
    # the one calibration per accelerator type. Other shapes follow from it (waves, K prologue, roofline).
    gemm_eff: float
    # Achieved fraction of peak for fused (flash) attention, forward + backward together.
    attn_eff: float
    # The same at head_dim <= 64 where measured (flash kernels run small heads far below large ones).
    attn_eff_hd64: float | None = None
    # Fraction of peak apogee's own engine gets from its GEMMs: eager PyTorch calls cuBLAS directly, so
    # this is cuBLAS's sustained efficiency measured outside any training stack (benchmarks/gemm_table.py),
    # at compute.GEMM_REF_SHAPE's size class. Used for runs with ``[train] stack = "apogee"`` (the
    # default); gemm_eff (calibrated on a published Megatron-LM run) for ``stack = "megatron"``. None:
    # not measured on this accelerator, gemm_eff is used for both.
    engine_gemm_eff: float | None = None
    # Fraction of mem_bw_gbs torch's fused AdamW kernel (apogee's optimizer, fused on CUDA) sustains over its
    # 28 bytes a parameter (estimate.ENGINE_ADAM_BYTES_PER_PARAM), for runs with stack = "apogee". None: not measured,
    # the streaming rate (hbm_eff) as for Megatron-LM's optimizer.
    engine_adam_bw_eff: float | None = None
    nvlink_busbw_gbs: float  # intra-node all-reduce bus bandwidth per GPU
    nic_gbs: float  # inter-node bandwidth per GPU (one NIC per GPU), achieved
    sms: int  # streaming multiprocessors: the unit of GEMM wave quantization
    power_w: float
    intra_lat_us: float = 10.0
    inter_lat_us: float = 20.0
    # Fraction of mem_bw_gbs a streaming kernel (copy, elementwise, norm) sustains: what the cost model
    # prices memory-bound work at. GPUs: 0.90 (STREAM-style copy/triad on A100 and H100 reaches ~90% of
    # the datasheet HBM figure; see docs/planner.md). The cpu device: 1.0, because its mem_bw_gbs is
    # itself a measured copy bandwidth (benchmarks/planner_vs_measured.py).
    hbm_eff: float = 0.90
    # Memory a rank holds that no tensor accounts for (runtime, workspaces, allocator slack), GiB.
    # GPUs: ~1 GiB of CUDA context plus NCCL buffers and caching-allocator fragmentation, ~2.5 GiB together
    # in Megatron-LM / torchtitan memory snapshots on H100. The cpu device: the rank process's resident
    # size before training (Python, torch, gloo), measured by benchmarks/planner_vs_measured.py.
    reserved_gib: float = 2.5
    # Host-bound execution (the cpu device). Each is measured by benchmarks/planner_vs_measured.py's
    # micro-benchmarks and priced against the engine's op counts (planner/host.py). On a GPU the host
    # enqueues kernels ahead of the device, so only host_call_s and host_node_s apply there (kernel launch
    # included; zero: not measured): apogee's eager micro-batch cannot run faster than its host dispatches
    # it, phase by phase (host.gpu_dispatch_s).
    host_call_s: float = 0.0  # seconds per Python-level torch call in a forward (dispatch + autograd record)
    host_node_s: float = 0.0  # seconds per autograd node run in the backward
    dtensor_call_s: float = 0.0  # seconds per DTensor op, forward + its backward (sharding propagation)
    fsdp_unit_s: float = 0.0  # seconds per FSDP2 unit per micro-batch: its hooks, copy-in/out, forward + backward
    # Cores the node's ranks share (cpu device): ranks x threads beyond them time-share, and collectives
    # (gloo: host copies and socket I/O) run on the same cores instead of overlapping compute. 0: not host-bound.
    cores: int = 0
    # Measured slowdown of a rank's work when all the node's ranks compute at once, against the same work
    # alone (cpu device; benchmarks/planner_vs_measured.py). On this sandboxed 2-vCPU runner two
    # single-threaded processes each run ~1.3x slower per CPU second and are descheduled part of the
    # time, although ranks x threads = cores. 0: not measured, the cores formula (host.oversubscription).
    contention: float = 0.0
    # Measured seconds of single [M,K]x[K,N] GEMMs, keyed by (M, N, K) (cpu device: small GEMMs are far
    # from any roofline; benchmarks/planner_vs_measured.py times each shape compute.gemm_shapes lists).
    gemm_table: dict | None = None
    # Measured seconds of one dense block's non-GEMM, non-attention work (two RMSNorms, rotary on q and k,
    # the SwiGLU product, two residual adds), forward + backward, keyed by compute.elem_key (cpu device:
    # the engine's fp32 block moves ~3x the bytes of a Megatron-style 16-bit count, much of it in strided
    # rotary ops far below copy bandwidth; benchmarks/planner_vs_measured.py times the engine's own modules).
    elem_table: dict | None = None
    # Measured seconds of single bf16 GEMMs on this accelerator outside the training stack, keyed by
    # (M, N, K), compute.GEMM_REF_SHAPE included (benchmarks/gemm_table.py): the shape dependence only.
    # The level stays the calibrated gemm_eff: a listed shape costs its measured time x (GEMM_REF_SHAPE's
    # in-stack time at gemm_eff) / (GEMM_REF_SHAPE's measured time). Unlisted shapes keep the shape model.
    gemm_shape_table: dict | None = None
    # Measured host seconds of one micro-batch's forward + backward on a structural replica of the
    # layout (the engine's model and parallel plans at near-zero size: every op, DTensor dispatch,
    # FSDP2 unit and collective the real step runs, with no compute or bytes to speak of), timed on
    # all the node's ranks at once: {"micro_batch": (per block, rest), "step": (per block, rest)} (the
    # step part: clipping, AdamW, zero_grad), keyed by host.host_key (cpu device;
    # benchmarks/planner_vs_measured.py). Where present it replaces the count model of planner/host.py
    # and already holds the contention and the collectives' latency.
    host_table: dict | None = None

    @property
    def stack_speed(self) -> float:
        """How fast the training stack runs each kernel, against the kernel timed alone: the calibrated
        in-stack GEMM efficiency (gemm_eff) over cuBLAS's measured one (engine_gemm_eff). The cost model
        applies it to attention and to memory-bound work as gemm_eff applies it to GEMMs: whatever the
        stack loses beside its kernels (docs/planner.md, "One stack speed for every kernel") is not
        GEMM-specific, and one GPT layer timed at the published rows' shards runs its attention and its
        GEMMs at their isolated efficiencies (benchmarks/gpu_layer_shapes.py). 1 for apogee's own stack
        (gemm_eff = engine_gemm_eff there) and where no kernel-level figure is measured."""
        return self.gemm_eff / self.engine_gemm_eff if self.engine_gemm_eff else 1.0

    @property
    def host_bound(self) -> bool:
        return self.cores > 0

    def peak(self, precision: str) -> float:
        """Peak FLOP/s for ``precision`` (bf16 or fp8)."""
        try:
            return self.peak_tflops[precision] * 1e12
        except KeyError:
            raise PlannerError(
                f"train.precision {precision!r} is not supported on {self.name}; "
                f"choose one of: {', '.join(sorted(self.peak_tflops))}"
            ) from None


# The one calibration per accelerator type (see the table's comments): the fraction of peak an 8192^3
# GEMM reaches inside each training stack, re-derived by `benchmarks/planner_accuracy.py --calibrate`.
A100_STACK_GEMM_EFF = 0.671
H100_STACK_GEMM_EFF = 0.516
# Causal flash-style attention forward + backward on Hopper, measured (see the h100-80gb entry).
H100_ATTN_EFF = 0.443
H100_ATTN_EFF_HD64 = 0.257
# cuBLAS bf16 on an H100 80GB HBM3 (torch 2.11, benchmarks/results/gemm-h100.json, 392 shapes timed back
# to back for 22 s): the median over its 318 shapes of at least 4096 x 4096 x 8192 is 0.695 of the dense
# peak (10th-90th percentile over all shapes 0.64-0.72; its own 8192^3 entry 0.654). A single short
# 8192^3 matmul reaches 0.807 (shared/planner/FORMULAS.md): a sustained sweep runs at lower clocks, as
# training does.
H100_ENGINE_GEMM_EFF = 0.695
# torch's fused AdamW (multi_tensor_apply, fp32 parameters, gradients, moments) on an H100 80GB HBM3, torch
# 2.11+cu130, timed by CUDA kernel in the engine's own steps (benchmarks/gpu_step_profile.py, stop 17):
# 25.2 ms for llama-1b's 1.236B parameters (28 bytes each: 1.37 TB/s) and 42.0 ms for the 4-layer
# Llama 3 8B's 1.923B (1.28 TB/s), 0.41 and 0.38 of the 3.35 TB/s datasheet figure, where a copy kernel
# streams at 0.9. The Hopper parts share it, as they share the GEMM figure.
H100_ENGINE_ADAM_BW_EFF = 0.40
# The host's dispatch of apogee's eager step on the lent H100 machine (Intel Xeon host, torch 2.11+cu130):
# one llama-1b micro-batch of 32 tokens, whose kernels are tiny, took 44 ms forward + backward in stop 17's
# run of benchmarks/gpu_host_dispatch.py (docs/planner.md, "Fused AdamW, energy and the host at micro-batch
# 1") for planner/host.py's 1,051 torch calls and 1,329 autograd nodes: 18.5 us each, a call or node with
# its kernel launch. Stop 18's run (benchmarks/results/h100-host-dispatch.json) timed the forward alone:
# 20.4 ms for llama-1b's 1,051 calls (19.4 us), 5.7 ms for the 4-layer Llama 3 8B's 271 (21 us).
H100_HOST_DISPATCH_S = 18.5e-6

ACCELERATORS: dict[str, Accelerator] = {
    # A100 SXM4: 312 TFLOP/s dense bf16/fp16 (NVIDIA A100 datasheet; Narayanan et al. 2021 use 312);
    # 1,555 GB/s (40GB) and 2,039 GB/s (80GB) HBM2e (NVIDIA A100 datasheet); NVLink3 600 GB/s
    # bidirectional = 300 GB/s per direction, of which NCCL all_reduce_perf reaches ~230 GB/s busbw
    # on a DGX A100 (NVIDIA DGX A100 user guide / nccl-tests results); one 200 Gb/s HDR HCA per GPU =
    # 25 GB/s, ~23.5 GB/s achieved (Selene, Narayanan 2021 §5); 108 SMs (A100 whitepaper); 400 W TDP.
    # gemm_eff (the A100 calibration): 0.671, re-derived by `benchmarks/planner_accuracy.py --calibrate`
    # from one documented measurement, Narayanan et al. 2021 Table 1's 1.7B run (tp=1, pp=1, pure data
    # parallel: the closest published single-GPU throughput of that stack, 137 TFLOP/s). For scale: a
    # plain large bf16 matmul reaches ~268 TFLOP/s = 0.86 (Bekman, ML Engineering, "MAMF" table).
    "a100-40gb": Accelerator(
        name="a100-40gb", peak_tflops={"bf16": 312.0}, mem_gib=40, mem_bw_gbs=1555, gemm_eff=A100_STACK_GEMM_EFF,
        attn_eff=0.45, nvlink_busbw_gbs=230, nic_gbs=23.5, sms=108, power_w=400,
    ),
    "a100-80gb": Accelerator(
        name="a100-80gb", peak_tflops={"bf16": 312.0}, mem_gib=80, mem_bw_gbs=2039, gemm_eff=A100_STACK_GEMM_EFF,
        attn_eff=0.45, nvlink_busbw_gbs=230, nic_gbs=23.5, sms=108, power_w=400,
    ),
    # H100 SXM5: 989 TFLOP/s dense bf16, 1,979 dense fp8 (NVIDIA H100 datasheet, half of the sparsity
    # figures); 3.35 TB/s HBM3 (datasheet); NVLink4 900 GB/s bidirectional, NCCL all-reduce busbw
    # ~360 GB/s without NVLS (nccl-tests on DGX H100); ConnectX-7 400 Gb/s per GPU = 50 GB/s, ~45 GB/s
    # achieved (NVIDIA DGX H100 reference architecture); 132 SMs (H100 whitepaper); 700 W TDP.
    # gemm_eff (the H100 calibration): 0.516, derived the same way from the Megatron-LM README's H100
    # 1.7B run (tp=1, pp=1, dp=48: 408.8 TFLOP/s), with attention and memory-bound work at the same
    # stack speed, gemm_eff / engine_gemm_eff = 0.742 (Accelerator.stack_speed; docs/planner.md, "One
    # stack speed for every kernel"). An 8192^3 bf16 matmul alone measures 798 TFLOP/s = 0.807 on an
    # H100 80GB with torch 2.11 (shared/planner/FORMULAS.md); calibrating on that instead over-predicts
    # every H100 row by 36-59%. What the stack loses against its kernels is not broken down by mechanism.
    # attn_eff: measured, PyTorch 2.11's causal scaled_dot_product_attention forward + backward in bf16
    # at head dim 128, seq 4096 (32 query / 8 kv heads, micro-batch 2) on an H100 80GB HBM3: 2.20 ms =
    # 438 TFLOP/s = 0.443 of peak (benchmarks/results/h100-engine-runs.json, planner_vs_measured_gpu.py);
    # attn_eff_hd64: the same call at head dim 64, seq 2048 (32 / 8 heads, micro-batch 4): 0.947 ms =
    # 254 TFLOP/s = 0.257. engine_gemm_eff: H100_ENGINE_GEMM_EFF (measured; the Hopper parts share it).
    # (FlashAttention-3's paper figures, Shah et al. 2024, would give ~0.5; FA3 is not what these
    # stacks ran.) At head dim 64, seq 2048 the same kernel reaches only 0.26-0.29.
    "h100-80gb": Accelerator(
        name="h100-80gb", peak_tflops={"bf16": 989.0, "fp8": 1979.0}, mem_gib=80, mem_bw_gbs=3350,
        gemm_eff=H100_STACK_GEMM_EFF, attn_eff=H100_ATTN_EFF, attn_eff_hd64=H100_ATTN_EFF_HD64,
        engine_gemm_eff=H100_ENGINE_GEMM_EFF, engine_adam_bw_eff=H100_ENGINE_ADAM_BW_EFF,
        host_call_s=H100_HOST_DISPATCH_S, host_node_s=H100_HOST_DISPATCH_S,
        nvlink_busbw_gbs=360, nic_gbs=45, sms=132, power_w=700,
    ),
    # H100 NVL 94/96 GB parts: same SXM compute figures for the 96 GB SXM variant (NVIDIA GH200/H100
    # 96GB datasheet), 3.9 TB/s HBM3. The Hopper parts below (h100-96gb, h200, h800) have the same SMs,
    # tensor cores and clocks as the h100-80gb and run the same training stack, so they share its
    # calibrated gemm_eff (H100_STACK_GEMM_EFF), not the raw 8192^3 matmul figure (0.807): the raw figure
    # would predict ~1.8x an H100's throughput for the same model. Their bandwidths differ and are used.
    "h100-96gb": Accelerator(
        name="h100-96gb", peak_tflops={"bf16": 989.0, "fp8": 1979.0}, mem_gib=96, mem_bw_gbs=3900,
        gemm_eff=H100_STACK_GEMM_EFF, attn_eff=H100_ATTN_EFF, attn_eff_hd64=H100_ATTN_EFF_HD64,
        engine_gemm_eff=H100_ENGINE_GEMM_EFF, engine_adam_bw_eff=H100_ENGINE_ADAM_BW_EFF,
        host_call_s=H100_HOST_DISPATCH_S, host_node_s=H100_HOST_DISPATCH_S,
        nvlink_busbw_gbs=360, nic_gbs=45, sms=132, power_w=700,
    ),
    # H200 SXM: same Hopper compute (989 bf16 dense), 141 GB HBM3e at 4.8 TB/s (NVIDIA H200 datasheet).
    "h200": Accelerator(
        name="h200", peak_tflops={"bf16": 989.0, "fp8": 1979.0}, mem_gib=141, mem_bw_gbs=4800,
        gemm_eff=H100_STACK_GEMM_EFF, attn_eff=H100_ATTN_EFF, attn_eff_hd64=H100_ATTN_EFF_HD64,
        engine_gemm_eff=H100_ENGINE_GEMM_EFF, engine_adam_bw_eff=H100_ENGINE_ADAM_BW_EFF,
        host_call_s=H100_HOST_DISPATCH_S, host_node_s=H100_HOST_DISPATCH_S,
        nvlink_busbw_gbs=360, nic_gbs=45, sms=132, power_w=700,
    ),
    # H800: H100 compute with NVLink cut to 400 GB/s bidirectional; DeepSeek-V3 report (2024, §3.2)
    # measures 160 GB/s NVLink and 50 GB/s InfiniBand per GPU.
    "h800": Accelerator(
        name="h800", peak_tflops={"bf16": 989.0, "fp8": 1979.0}, mem_gib=80, mem_bw_gbs=3350,
        gemm_eff=H100_STACK_GEMM_EFF, attn_eff=H100_ATTN_EFF, attn_eff_hd64=H100_ATTN_EFF_HD64,
        engine_gemm_eff=H100_ENGINE_GEMM_EFF, engine_adam_bw_eff=H100_ENGINE_ADAM_BW_EFF,
        host_call_s=H100_HOST_DISPATCH_S, host_node_s=H100_HOST_DISPATCH_S,
        nvlink_busbw_gbs=160, nic_gbs=45, sms=132, power_w=700,
    ),
    # B200: 2.25 PFLOP/s dense bf16, 4.5 dense fp8, 192 GB (180 usable) HBM3e at 8 TB/s, NVLink5 1.8 TB/s
    # bidirectional (NVIDIA DGX B200 datasheet); 148 SMs; 1000 W. gemm_eff: no B200 training-stack
    # measurement is documented; assumed equal to the H100 stack's (H100_STACK_GEMM_EFF), not the raw
    # Hopper matmul figure (0.807), which over-predicts training throughput by ~1.8x on Hopper.
    "b200": Accelerator(
        name="b200", peak_tflops={"bf16": 2250.0, "fp8": 4500.0}, mem_gib=180, mem_bw_gbs=8000,
        gemm_eff=H100_STACK_GEMM_EFF, attn_eff=0.50, nvlink_busbw_gbs=720, nic_gbs=45, sms=148, power_w=1000,
    ),
    # A CPU "device" for the gloo test runs (fp32: the engine trains in fp32 on CPU): nominal figures for
    # a 2-core x86 runner (AVX2 FMA, 2 cores x 2.5 GHz x 32 fp32 FLOP/cycle = 160 GFLOP/s). gemm_eff,
    # attn_eff, mem_bw_gbs and reserved_gib here are nominal; benchmarks/planner_vs_measured.py replaces
    # them with what its micro-benchmark measures on the machine at hand (cpu_from_measurement), as it does
    # the host costs (host_call_s ... fsdp_unit_s: nominal orders of magnitude here, from one run of those
    # micro-benchmarks on the 2-core runner) and the gloo link (nvlink_busbw_gbs, intra_lat_us).
    "cpu": Accelerator(
        name="cpu", peak_tflops={"bf16": 0.16, "fp32": 0.16}, mem_gib=24, mem_bw_gbs=20, gemm_eff=0.3,
        attn_eff=0.15, nvlink_busbw_gbs=5, nic_gbs=1, sms=2, power_w=65, intra_lat_us=50, inter_lat_us=100,
        reserved_gib=0.35, hbm_eff=1.0, host_call_s=5e-6, host_node_s=5e-6, dtensor_call_s=150e-6,
        fsdp_unit_s=2e-3, cores=2,
    ),
}


@dataclass(frozen=True, kw_only=True)
class Cluster:
    accel: Accelerator
    gpus: int
    gpus_per_node: int = 8
    intra_busbw_gbs: float = 0.0  # 0: the accelerator's NVLink figure
    inter_gbs_per_gpu: float = 0.0  # 0: the accelerator's NIC figure
    nodes_per_rack: int = 32
    # Per node. Llama 3 (Dubey et al. 2024, §3.3.4): 419 unexpected interruptions in 54 days on 16,384
    # H100s = 2,048 nodes -> 54*24/419 = 3.09 h per job failure x 2,048 nodes = ~6,300 h per node.
    node_mtbf_hours: float = 6_300.0
    checkpoint_write_gbs: float = 100.0  # aggregate write bandwidth to durable storage, GB/s
    restart_s: float = 600.0  # time from a failure to training again (detection + restart + reload)
    # Energy (estimate._energy). Each accelerator draws its TDP (Accelerator.power_w) for the whole run:
    # the convention of Meta's Llama 2 paper (Touvron et al. 2023, Table 2: "peak power capacity per GPU
    # device ... adjusted for power usage efficiency") and the Llama 3 model card (700 W per H100-80GB).
    # node_power_w: what each node draws besides its accelerators (CPUs, memory, NICs, fans); 0 counts the
    # accelerators only. For scale, a DGX H100 is rated 10.2 kW max, of which its 8 GPUs' TDP is 5.6 kW
    # (NVIDIA DGX H100 datasheet). pue: the data centre's power usage effectiveness (facility / IT power).
    node_power_w: float = 0.0
    pue: float = 1.0

    def __post_init__(self) -> None:
        if self.gpus <= 0 or self.gpus_per_node <= 0:
            raise PlannerError("cluster.gpus and cluster.gpus_per_node must be positive")
        if self.node_power_w < 0:
            raise PlannerError(f"cluster.node_power_w={self.node_power_w} must be >= 0 (watts per node)")
        if self.pue < 1:
            raise PlannerError(f"cluster.pue={self.pue} must be >= 1 (facility power / IT power)")
        if self.gpus % self.gpus_per_node and self.gpus > self.gpus_per_node:
            raise PlannerError(
                f"cluster.gpus={self.gpus} is not a multiple of cluster.gpus_per_node={self.gpus_per_node}"
            )

    @property
    def nodes(self) -> int:
        return max(1, self.gpus // self.gpus_per_node)

    @property
    def intra_bw(self) -> float:
        return (self.intra_busbw_gbs or self.accel.nvlink_busbw_gbs) * 1e9

    @property
    def inter_bw(self) -> float:
        return (self.inter_gbs_per_gpu or self.accel.nic_gbs) * 1e9

    @property
    def power_w(self) -> float:
        """What the whole cluster draws from the grid while the job runs: accelerators at TDP, nodes, PUE."""
        return (self.gpus * self.accel.power_w + self.nodes * self.node_power_w) * self.pue

    @property
    def mtbf_s(self) -> float:
        """Mean time between failures of the whole job (any node failing stops it)."""
        return self.node_mtbf_hours * 3600.0 / self.nodes


_CLUSTER_KEYS = {f.name for f in dataclasses.fields(Cluster)} - {"accel"} | {"gpu", "file", "gemm_table"}


def get_accelerator(name: str) -> Accelerator:
    try:
        return ACCELERATORS[name.lower()]
    except KeyError:
        raise PlannerError(
            f"unknown cluster.gpu {name!r}; choose one of: {', '.join(ACCELERATORS)}"
        ) from None


def cluster_from_dict(d: dict, *, where: str = "[cluster]", base_dir: Path | None = None) -> Cluster:
    """Build a Cluster from a ``[cluster]`` table (or a cluster.toml, via ``file = ...``)."""
    d = dict(d)
    if "file" in d:
        path = Path(d.pop("file"))
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        loaded = load_toml(path)
        loaded = loaded.get("cluster", loaded)
        loaded.update(d)  # keys next to `file` override the file
        return cluster_from_dict(loaded, where=str(path), base_dir=path.parent)
    unknown = set(d) - _CLUSTER_KEYS
    if unknown:
        raise PlannerError(f"unknown key {where}.{sorted(unknown)[0]}; known: {', '.join(sorted(_CLUSTER_KEYS))}")
    if "gpu" not in d or "gpus" not in d:
        raise PlannerError(f"{where} needs gpu = \"<type>\" and gpus = <count>")
    accel = get_accelerator(str(d.pop("gpu")))
    if "gemm_table" in d:  # a measured shape table for this accelerator (benchmarks/gemm_table.py)
        path = Path(d.pop("gemm_table"))
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        accel = dataclasses.replace(accel, gemm_shape_table=load_gemm_shape_table(path, accel.name))
    try:
        return Cluster(accel=accel, **d)
    except TypeError as e:
        raise PlannerError(f"{where}: {e}") from None


def load_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise PlannerError(f"file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise PlannerError(f"{path}: invalid TOML: {e}") from None


def load_gemm_shape_table(path, accelerator: str) -> dict:
    """The (M, N, K) -> seconds table benchmarks/gemm_table.py wrote for ``accelerator``; one line
    naming the file if it is unreadable, for another accelerator, or lacks the reference shape."""
    import json
    from pathlib import Path

    from apogee.planner.compute import GEMM_REF_SHAPE

    try:
        doc = json.loads(Path(path).read_text())
        table = {(int(m), int(n), int(k)): float(t) for m, n, k, t in doc["entries"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PlannerError(f"GEMM table {path} is not readable ({type(exc).__name__}: {exc}); "
                           f"write it with benchmarks/gemm_table.py") from exc
    if doc.get("accelerator") != accelerator:
        raise PlannerError(f"GEMM table {path} was measured for {doc.get('accelerator')!r}, not {accelerator!r}")
    if doc.get("dtype") != "bf16":
        raise PlannerError(f"GEMM table {path} holds {doc.get('dtype')} GEMMs; the planner prices bf16 with it")
    if GEMM_REF_SHAPE not in table:
        raise PlannerError(f"GEMM table {path} lacks the reference shape {GEMM_REF_SHAPE}: it sets the scale")
    return table
