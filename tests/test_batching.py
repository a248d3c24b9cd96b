"""Bucket batching: one shape per batch, every sample once per epoch, the image ratio, exact resume."""

from collections import Counter

import pytest

from hvctl.data.batching import BucketBatchSampler, epoch_batches

BUCKETS = {
    (64, 64, 17): list(range(0, 10)),
    (64, 96, 17): list(range(10, 17)),
    (64, 64, 1): list(range(17, 29)),
    (96, 64, 1): list(range(29, 31)),  # fewer than a batch: never batched
}
SHAPE = {i: b for b, ix in BUCKETS.items() for i in ix}


def test_an_epoch_batches_each_bucket_separately():
    batches = epoch_batches(BUCKETS, 3, seed=0, epoch=0)
    assert all(len({SHAPE[i] for i in b}) == 1 and len(b) == 3 for b in batches)
    seen = Counter(i for b in batches for i in b)
    assert max(seen.values()) == 1 and len(seen) == 9 + 6 + 12
    assert batches != epoch_batches(BUCKETS, 3, seed=0, epoch=1)
    assert batches == epoch_batches(BUCKETS, 3, seed=0, epoch=0)


def test_image_ratio_is_respected():
    sampler = BucketBatchSampler(BUCKETS, 2, seed=1, image_ratio=0.25)
    kinds = [SHAPE[next(sampler)[0]][2] == 1 for _ in range(2000)]
    assert 0.2 < sum(kinds) / len(kinds) < 0.3


def test_resume_gives_the_same_batches():
    a = BucketBatchSampler(BUCKETS, 2, seed=7, image_ratio=0.5)
    head = [next(a) for _ in range(13)]
    state = a.state_dict()
    tail = [next(a) for _ in range(30)]
    b = BucketBatchSampler(BUCKETS, 2, seed=7, image_ratio=0.5)
    b.load_state_dict(state)
    assert [next(b) for _ in range(30)] == tail
    assert head != tail[:13]


def test_no_full_batch_is_an_error():
    with pytest.raises(ValueError, match="full batch"):
        BucketBatchSampler({(64, 64, 17): [0, 1]}, 4)
