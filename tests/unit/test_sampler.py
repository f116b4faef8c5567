import numpy as np
import pytest
import torch

from apogee.data.sampler import TrainSampler, split_tokens, val_batches

TOKENS = np.arange(10_000, dtype=np.uint16) % 251


def take(sampler, steps, global_batch=8, dp_rank=0, dp_size=1):
    return [sampler.next_batch(global_batch=global_batch, dp_rank=dp_rank, dp_size=dp_size) for _ in range(steps)]


def test_same_seed_same_batches_and_targets_shifted():
    a = take(TrainSampler(TOKENS, seq_len=16, seed=1), 5)
    b = take(TrainSampler(TOKENS, seq_len=16, seed=1), 5)
    c = take(TrainSampler(TOKENS, seq_len=16, seed=2), 5)
    for x, y in zip(a, b):
        assert torch.equal(x.inputs, y.inputs)
    assert not torch.equal(a[0].inputs, c[0].inputs)
    assert torch.equal(a[0].inputs[:, 1:], a[0].targets[:, :-1])


def test_data_parallel_ranks_partition_the_global_batch():
    whole = take(TrainSampler(TOKENS, seq_len=16, seed=1), 3)
    halves = [take(TrainSampler(TOKENS, seq_len=16, seed=1), 3, dp_rank=r, dp_size=2) for r in range(2)]
    for step in range(3):
        joined = torch.cat([halves[0][step].inputs, halves[1][step].inputs])
        assert torch.equal(joined, whole[step].inputs)


def test_resume_continues_with_exactly_the_next_batch():
    straight = TrainSampler(TOKENS, seq_len=16, seed=1)
    expected = take(straight, 100)  # crosses several epochs (~624 windows per epoch / 8)
    first = TrainSampler(TOKENS, seq_len=16, seed=1)
    take(first, 37)
    state = first.state_dict()
    resumed = TrainSampler(TOKENS, seq_len=16, seed=1)
    resumed.load_state_dict(state)
    for x, y in zip(take(resumed, 63), expected[37:]):
        assert torch.equal(x.inputs, y.inputs)


def test_an_epoch_visits_every_window_once_and_epochs_differ():
    sampler = TrainSampler(TOKENS, seq_len=16, seed=1)
    n = (len(TOKENS) - 1) // 16
    first_epoch = sampler.window_starts(0, n)
    assert sorted(first_epoch.tolist()) == list(range(0, n * 16, 16))
    second = sampler.window_starts(n, 10)
    assert (second % 16 != 0).all() or not np.array_equal(second, first_epoch[:10])


def test_resume_refuses_another_seed():
    sampler = TrainSampler(TOKENS, seq_len=16, seed=1)
    with pytest.raises(ValueError, match="train.seed"):
        TrainSampler(TOKENS, seq_len=16, seed=2).load_state_dict(sampler.state_dict())


def test_val_set_is_the_same_for_any_data_parallel_size():
    _, val = split_tokens(TOKENS, 0.1)
    assert len(val) == 1000
    one = torch.cat([b.inputs for b in val_batches(val, seq_len=16, global_batch=8, micro_batch=2, batches=3, dp_rank=0, dp_size=1)])
    two = torch.cat([
        b.inputs
        for r in range(2)
        for b in val_batches(val, seq_len=16, global_batch=8, micro_batch=2, batches=3, dp_rank=r, dp_size=2)
    ])
    assert torch.equal(one, two)


def test_too_small_corpus_names_the_setting():
    with pytest.raises(ValueError, match="train.seq_len"):
        TrainSampler(TOKENS[:20], seq_len=16, seed=1)
