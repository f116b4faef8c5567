"""Collective costs, priced with the ring formulas against NCCL bus bandwidth, on the link an axis uses.

Rank order (innermost first) is tp, cp, dp, pp, as in Megatron-LM and torchtitan: an axis whose group
fits inside a node runs on NVLink; one that spans nodes runs at the inter-node bandwidth of the group's
members in each node (NCCL drives one NIC per GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

from apogee.planner.cluster import Cluster
from apogee.planner.spec import Layout

AXIS_ORDER = ("tp", "cp", "dp", "pp")


@dataclass(frozen=True)
class Link:
    busbw: float  # bytes/s
    latency: float  # seconds per ring step
    crosses_nodes: bool

    def describe(self) -> str:
        kind = "inter-node" if self.crosses_nodes else "NVLink"
        return f"{kind} {self.busbw / 1e9:.0f} GB/s"


def axis_stride(lay: Layout, axis: str) -> int:
    stride = 1
    for a in AXIS_ORDER:
        if a == axis:
            return stride
        stride *= getattr(lay, a)
    raise KeyError(axis)


def axis_link(lay: Layout, axis: str, cluster: Cluster, *, size: int | None = None, stride: int | None = None) -> Link:
    size = getattr(lay, axis) if size is None else size
    stride = axis_stride(lay, axis) if stride is None else stride
    gpn = cluster.gpus_per_node
    if size * stride <= gpn:
        return Link(cluster.intra_bw, cluster.accel.intra_lat_us * 1e-6, False)
    per_node = max(1, gpn // stride) if stride < gpn else 1
    bw = min(cluster.intra_bw, per_node * cluster.inter_bw)
    return Link(bw, cluster.accel.inter_lat_us * 1e-6, True)


def all_reduce(nbytes: float, n: int, link: Link) -> float:
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes / link.busbw + 2 * (n - 1) * link.latency


def all_gather(nbytes: float, n: int, link: Link) -> float:
    """``nbytes`` is the size of the gathered (full) tensor; reduce-scatter costs the same."""
    if n <= 1:
        return 0.0
    return (n - 1) / n * nbytes / link.busbw + (n - 1) * link.latency


reduce_scatter = all_gather


def members_per_node(n: int, stride: int, gpus_per_node: int) -> int:
    """How many of a group's ``n`` ranks, ``stride`` apart, share a node with any one of them."""
    return min(n, max(1, gpus_per_node // stride))


def all_to_all(nbytes: float, n: int, stride: int, cluster: Cluster) -> float:
    """Seconds for each of ``n`` ranks, ``stride`` apart, to send ``nbytes`` in equal shares to every rank
    of the group (its own included). Unlike a ring, nothing is forwarded: the shares for peers in the same
    node cross NVLink, the rest leave through the rank's own NIC (one per GPU), both at once, so a group
    spanning nodes runs at about the NIC's rate, not at the node's NICs together."""
    if n <= 1:
        return 0.0
    local = members_per_node(n, stride, cluster.gpus_per_node)
    intra = (local - 1) / n * nbytes / cluster.intra_bw
    inter = (n - local) / n * nbytes / cluster.inter_bw
    latency = cluster.accel.inter_lat_us if n > local else cluster.accel.intra_lat_us
    return max(intra, inter) + latency * 1e-6


def expert_dispatch(token_bytes: float, experts: int, top_k: int, n: int, stride: int, cluster: Cluster, *,
                    deduplicated: bool = False) -> float:
    """Seconds to send a rank's tokens (``token_bytes``, one copy of each) to the ranks holding the ``top_k``
    experts each is routed to, over an expert group of ``n`` ranks ``stride`` apart, routing uniform (balanced).

    A plain all-to-all (Megatron-LM's alltoall dispatcher) sends one copy per routed expert. ``deduplicated``
    (DeepEP, DeepSeek-V3 §3.2.2): a token crosses InfiniBand once per node that holds any of its experts, to
    the GPU of the same index there, which forwards it over NVLink once per rank that holds any of them; so
    the NIC carries the expected number of other nodes hit, not the copies."""
    if not deduplicated:
        return all_to_all(top_k * token_bytes, n, stride, cluster)
    if n <= 1:
        return 0.0

    def hit(held: float) -> float:
        """Probability that ``held`` of the experts include one of a token's top_k (drawn without replacement)."""
        miss = 1.0
        for i in range(top_k):
            miss *= max(0.0, (experts - held - i) / (experts - i))
        return 1.0 - miss
    local = members_per_node(n, stride, cluster.gpus_per_node)
    nodes = n / local
    intra = (local - 1) * hit(experts / n) * nodes  # copies a GPU sends or forwards over NVLink
    inter = (nodes - 1) * hit(experts * local / n)  # copies it sends through its NIC
    latency = cluster.accel.inter_lat_us if n > local else cluster.accel.intra_lat_us
    return max(intra * token_bytes / cluster.intra_bw, inter * token_bytes / cluster.inter_bw) + latency * 1e-6


def p2p(nbytes: float, link: Link) -> float:
    return nbytes / link.busbw + link.latency
