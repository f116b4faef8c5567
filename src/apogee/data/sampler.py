"""Deterministic batches of token windows whose position is part of the checkpoint.

The order of training samples is a function of the seed alone, never of the layout: step ``s``
takes the next ``global_batch`` windows of a global sequence, and data-parallel rank ``r`` takes its
contiguous slice of them. So any number of data-parallel ranks sees the same global batch at each
step (which is what makes a parallel run reproduce the single-process loss), and the only state to
checkpoint is how many windows have been consumed.

A window is ``seq_len + 1`` tokens (inputs and their next-token targets). Each epoch shuffles the
windows with its own seed and shifts the window grid by an epoch-dependent offset, so that later
epochs do not repeat the same boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def split_tokens(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The first (1 - val_fraction) of the stream trains, the rest validates: no window spans both."""
    cut = int(len(tokens) * (1.0 - val_fraction))
    return tokens[:cut], tokens[cut:]


@dataclass(frozen=True)
class Batch:
    inputs: torch.Tensor  # [batch, seq_len] int64
    targets: torch.Tensor  # [batch, seq_len] int64


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> Batch:
    rows = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts])
    data = torch.from_numpy(rows)
    return Batch(inputs=data[:, :-1], targets=data[:, 1:])


class TrainSampler:
    """Global stream of shuffled windows over ``tokens``; ``state_dict`` is the consumed count."""

    def __init__(self, tokens: np.ndarray, *, seq_len: int, seed: int):
        if len(tokens) < 2 * (seq_len + 1):
            raise ValueError(
                f"the training split has {len(tokens)} tokens, too few for train.seq_len={seq_len}; "
                f"use a bigger corpus (data.path) or a shorter train.seq_len"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.consumed = 0  # windows taken so far, over all ranks
        self.skips: dict[int, int] = {}  # first global window -> count: step windows never trained on
        self._epoch = -1
        self._epoch_starts: np.ndarray | None = None
        self._epoch_first = 0  # global index of the current epoch's first window

    def _epoch_size(self, epoch: int) -> int:
        return (len(self.tokens) - 1 - self._offset(epoch)) // self.seq_len

    def _offset(self, epoch: int) -> int:
        # Epoch 0 starts at token 0; later epochs shift the grid by a seeded offset.
        if epoch == 0:
            return 0
        return int(torch.randint(self.seq_len, (1,), generator=self._generator(epoch, salt=1)).item())

    def _generator(self, epoch: int, salt: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 2 + salt)

    def _load_epoch_for(self, index: int) -> None:
        """Make the epoch holding global window ``index`` current."""
        if self._epoch_starts is not None and self._epoch_first <= index < self._epoch_first + len(self._epoch_starts):
            return
        epoch, first = 0, 0
        while first + self._epoch_size(epoch) <= index:
            first += self._epoch_size(epoch)
            epoch += 1
        n = self._epoch_size(epoch)
        order = torch.randperm(n, generator=self._generator(epoch)).numpy()
        self._epoch, self._epoch_first = epoch, first
        self._epoch_starts = self._offset(epoch) + order.astype(np.int64) * self.seq_len

    def window_starts(self, first: int, count: int) -> np.ndarray:
        """Token offsets of global windows ``first .. first + count - 1``."""
        out = np.empty(count, dtype=np.int64)
        for i in range(count):
            self._load_epoch_for(first + i)
            out[i] = self._epoch_starts[first + i - self._epoch_first]
        return out

    def next_batch(self, *, global_batch: int, dp_rank: int, dp_size: int) -> Batch:
        """This rank's share of the next global batch, and advance the stream by one step."""
        per_rank = global_batch // dp_size
        while self.consumed in self.skips:  # an anomaly's batch (resilience/anomalies.py)
            self.consumed += self.skips[self.consumed]
        starts = self.window_starts(self.consumed + dp_rank * per_rank, per_rank)
        self.consumed += global_batch
        return _windows(self.tokens, starts, self.seq_len)

    def skip(self, first: int, count: int) -> None:
        """Never train on global windows ``first .. first + count - 1``: a step that reaches
        ``first`` takes the windows after them (the same choice in every layout and on resume)."""
        self.skips[int(first)] = int(count)

    @property
    def epoch(self) -> float:
        self._load_epoch_for(self.consumed)
        return self._epoch + (self.consumed - self._epoch_first) / self._epoch_size(self._epoch)

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seed": self.seed, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed or state["seq_len"] != self.seq_len:
            raise ValueError(
                f"the checkpoint's data order was made with train.seed={state['seed']} and "
                f"train.seq_len={state['seq_len']}; resume with the same values"
            )
        self.consumed = int(state["consumed"])


def val_batches(tokens: np.ndarray, *, seq_len: int, global_batch: int, micro_batch: int, batches: int,
                dp_rank: int, dp_size: int):
    """A fixed validation set: the first ``batches x global_batch`` windows of the split, in order.

    Its size is counted in global batches so that every layout evaluates the same windows; each
    data-parallel rank takes its contiguous share, in micro-batches. Windows wrap around a short split.
    """
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"the validation split has {len(tokens)} tokens, fewer than train.seq_len + 1; "
            f"raise data.val_fraction or shorten train.seq_len"
        )
    n_windows = (len(tokens) - 1) // seq_len
    per_rank = batches * global_batch // dp_size
    indices = (np.arange(dp_rank * per_rank, (dp_rank + 1) * per_rank) % n_windows) * seq_len
    for first in range(0, per_rank, micro_batch):
        yield _windows(tokens, indices[first : first + micro_batch], seq_len)
