"""Samplers (sharding, advance, determinism) and make_data_loader (seeded, distinct random streams per worker)."""

import itertools
import random

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from celldino.data.augment import CellAugmentationDINO
from celldino.data.loaders import (
    EpochSampler,
    InfiniteSampler,
    SamplerType,
    ShardedInfiniteSampler,
    make_data_loader,
)


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


@pytest.mark.parametrize("cls", [InfiniteSampler, ShardedInfiniteSampler])
def test_ranks_partition_each_epoch(cls):
    n, world = 23, 3
    streams = [take(cls(sample_count=n, shuffle=True, seed=5, start=r, step=world), 40) for r in range(world)]
    sizes = [len(range(r, n, world)) for r in range(world)]
    first_epoch = [s[:k] for s, k in zip(streams, sizes)]
    union = sorted(itertools.chain.from_iterable(first_epoch))
    assert union == list(range(n))  # disjoint and complete
    for s, k in zip(streams, sizes):
        assert sorted(s[k : 2 * k]) == sorted(s[:k]) or cls is InfiniteSampler  # sharded: fixed shard
    assert take(cls(sample_count=n, shuffle=True, seed=5, start=1, step=world), 40) == streams[1]
    assert take(cls(sample_count=n, shuffle=True, seed=6, start=1, step=world), 40) != streams[1]


@pytest.mark.parametrize("cls", [InfiniteSampler, ShardedInfiniteSampler])
@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("advance", [0, 3, 7, 8, 29])
def test_advance_equals_skipping(cls, shuffle, advance):
    kw = dict(sample_count=17, shuffle=shuffle, seed=3, start=1, step=2)
    full = take(cls(**kw), 60)
    assert take(cls(advance=advance, **kw), 60 - advance) == full[advance:]


def test_unshuffled_order_and_new_permutation_each_epoch():
    assert take(InfiniteSampler(sample_count=5, start=0, step=1), 12) == [0, 1, 2, 3, 4] * 2 + [0, 1]
    s = take(ShardedInfiniteSampler(sample_count=50, shuffle=True, seed=0, start=0, step=1), 100)
    assert sorted(s[:50]) == sorted(s[50:]) == list(range(50)) and s[:50] != s[50:]


@pytest.mark.parametrize("cls", [InfiniteSampler, ShardedInfiniteSampler])
def test_bad_sampler_arguments_name_the_sampler(cls):
    with pytest.raises(ValueError, match=f"{cls.__name__}: sample_count must be >= 1, got 0"):
        cls(sample_count=0)
    with pytest.raises(ValueError, match="start < step"):
        cls(sample_count=5, start=2, step=2)


def test_sharded_new_shuffle_flag_gives_the_same_stream():
    kw = dict(sample_count=19, shuffle=True, seed=4, start=1, step=3)
    assert take(ShardedInfiniteSampler(use_new_shuffle_tensor_slice=True, **kw), 30) == take(
        ShardedInfiniteSampler(**kw), 30)


def test_epoch_sampler():
    s = EpochSampler(size=25, sample_count=10, shuffle=True, seed=1, start=0, step=1)
    e0 = list(s)
    assert len(e0) == len(s) == 25 and np.bincount(e0, minlength=10).max() <= 3  # drawn from 3 tiled copies
    assert list(s) == e0
    s.set_epoch(1)
    assert list(s) != e0
    ranks = [list(EpochSampler(size=25, sample_count=10, shuffle=True, seed=1, start=r, step=2)) for r in range(2)]
    assert len(ranks[0]) == 13 and len(ranks[1]) == 12
    assert sorted(ranks[0] + ranks[1]) == sorted(e0)


class _RandomDraws(Dataset):
    """Each item reports numpy-global, Python-random and CellAugmentation draws made inside the worker."""

    def __init__(self):
        self.aug = CellAugmentationDINO((0.3, 1.0), (0.05, 0.3), 1, 8, 4, seed=123)

    def __len__(self):
        return 8

    def __getitem__(self, i):
        p = self.aug.sample_params([(4, 32, 32)])
        return torch.tensor([np.random.random(), random.random(), float(p.box[0, 0] * 100 + p.box[0, 1]),
                             float(p.brightness[0, 0])], dtype=torch.float64)


def _draws(seed, workers=2):
    dl = make_data_loader(dataset=_RandomDraws(), batch_size=1, num_workers=workers, seed=seed,
                          sampler_type=SamplerType.INFINITE, shuffle=False)
    return torch.cat(take(dl, 8))


def test_workers_draw_distinct_streams_and_are_reproducible():
    a = _draws(seed=0)
    # items 0, 2, 4, 6 come from worker 0, items 1, 3, 5, 7 from worker 1: no stream may repeat across workers
    for col in range(4):
        assert len(set(a[:, col].tolist())) == 8 or col == 2, col
        assert a[0::2, col].tolist() != a[1::2, col].tolist(), col
    assert torch.equal(a, _draws(seed=0))
    assert not torch.equal(a, _draws(seed=1))


def test_make_data_loader_options():
    ds = _RandomDraws()
    dl = make_data_loader(dataset=ds, batch_size=3, num_workers=0, sampler_type=SamplerType.EPOCH, shuffle=True,
                          drop_last=False, pin_memory=False)
    assert len(dl) == 3 and sum(len(b) for b in dl) == 8
    dl = make_data_loader(dataset=ds, batch_size=2, num_workers=0, sampler_type=None, shuffle=False)
    assert len(list(dl)) == 4
    dl = make_data_loader(dataset=ds, batch_size=2, num_workers=1, sampler_type="SHARDED_INFINITE",
                          persistent_workers=True, prefetch_factor=4)
    assert dl.persistent_workers and dl.prefetch_factor == 4 and len(take(dl, 3)) == 3
    with pytest.raises(ValueError, match="advance"):
        make_data_loader(dataset=ds, batch_size=2, num_workers=0, sampler_type=SamplerType.EPOCH, sampler_advance=2)
