"""Rank placement: which ranks share a node and which link each parallel axis crosses.

Ranks are laid out tp innermost, then cp, dp, pp (Megatron-LM's and torchtitan's order), so the
chattiest axis (tp: several collectives per layer) stays on NVLink, and pp, which only sends one
activation per micro-batch, takes the slow links.
"""

from __future__ import annotations

from apogee.planner import comms
from apogee.planner.cluster import Cluster
from apogee.planner.spec import Layout


def rank_coords(rank: int, lay: Layout) -> dict[str, int]:
    coords = {}
    for axis in comms.AXIS_ORDER:
        n = getattr(lay, axis)
        coords[axis] = rank % n
        rank //= n
    return coords


def describe(lay: Layout, cluster: Cluster) -> list[str]:
    gpn = cluster.gpus_per_node
    lines = [f"{cluster.gpus} ranks on {cluster.nodes} node(s) of {gpn}; rank = "
             + " + ".join(f"{a}_idx*{comms.axis_stride(lay, a)}" for a in comms.AXIS_ORDER if getattr(lay, a) > 1)
             or "rank 0 only"]
    for axis in comms.AXIS_ORDER:
        n = getattr(lay, axis)
        if n == 1:
            continue
        stride = comms.axis_stride(lay, axis)
        link = comms.axis_link(lay, axis, cluster)
        members = [i * stride for i in range(n)]
        shown = ", ".join(map(str, members[:8])) + (", ..." if n > 8 else "")
        lines.append(f"  {axis:>2} groups of {n} (stride {stride}, e.g. ranks {shown}): {link.describe()}")
    if lay.dp_replicate > 1:  # HSDP: the dp axis splits into shards (inner) and replicas (outer)
        shard, stride = lay.dp // lay.dp_replicate, comms.axis_stride(lay, "dp")
        for name, n, step in (("dp_shard", shard, stride), ("dp_replicate", lay.dp_replicate, stride * shard)):
            link = comms.axis_link(lay, "dp", cluster, size=n, stride=step)
            lines.append(f"  {name} groups of {n} (stride {step}): {link.describe()}")
    if lay.ep > 1:
        local = comms.members_per_node(lay.ep, lay.etp, gpn)
        where = ("all in a node on NVLink" if local == lay.ep else
                 f"{local} in a node, the rest through each GPU's NIC at {cluster.inter_bw / 1e9:.0f} GB/s")
        split = "whole" if lay.etp == 1 else f"split {lay.etp} ways"
        lines.append(f"  ep groups of {lay.ep} carved from tp x dp x cp (stride {lay.etp}, experts {split}): {where}")
    node0 = list(range(min(gpn, cluster.gpus)))
    first = rank_coords(node0[0], lay)
    last = rank_coords(node0[-1], lay)
    lines.append(f"  node 0 holds ranks {node0[0]}-{node0[-1]}: "
                 + ", ".join(f"{a} {first[a]}..{last[a]}" for a in comms.AXIS_ORDER if getattr(lay, a) > 1))
    return lines
