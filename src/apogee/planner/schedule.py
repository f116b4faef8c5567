"""Pipeline schedules: the idle fraction each one leaves and how many micro-batches it keeps alive."""

from __future__ import annotations


def bubble_slots(schedule: str, p: int, v: int) -> float:
    """Idle time of a pipeline in units of one micro-batch's forward+backward on one stage.

    GPipe and 1F1B: p-1 (Narayanan et al. 2021 §2.2); interleaved 1F1B with v model chunks per rank:
    (p-1)/v (ibid. §2.2.2); zero-bubble ZB-H1 (Qi et al. 2023, §3): the backward's weight-gradient half
    fills the cool-down, leaving about a third of 1F1B's bubble at 1F1B's memory.
    """
    if p <= 1:
        return 0.0
    if schedule == "interleaved-1f1b":
        return (p - 1) / max(1, v)
    if schedule == "zero-bubble":
        return (p - 1) / 3
    return float(p - 1)


def bubble_fraction(schedule: str, p: int, v: int, m: int) -> float:
    """Bubble time over ideal time, (p-1)/m for 1F1B (Narayanan Eq. 1)."""
    return bubble_slots(schedule, p, v) / max(1, m)
