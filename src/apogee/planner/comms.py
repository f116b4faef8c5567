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


def all_to_all(nbytes: float, n: int, link: Link) -> float:
    """``nbytes`` sent by each rank in total (its share to every peer)."""
    if n <= 1:
        return 0.0
    return (n - 1) / n * nbytes / link.busbw + link.latency


def p2p(nbytes: float, link: Link) -> float:
    return nbytes / link.busbw + link.latency
