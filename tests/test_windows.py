"""Which windows each rank and step reads: disjoint, world-size invariant, resumable."""

from __future__ import annotations

import numpy as np

from rwkv_train.data.binidx import BinIdx
from rwkv_train.data.sampling import magic_prime, window_start
from rwkv_train.data.windows import BatchLayout, TrainSampler, TrainWindows, ValWindows
from tests.conftest import write_corpus


def samples(micro, acc, world, rank, steps, start=0):
    return list(TrainSampler(BatchLayout(micro, acc, world, rank), steps, start_step=lambda: start))


def test_ranks_draw_disjoint_samples_that_a_single_process_also_draws():
    two = [samples(2, 1, 2, r, steps=5) for r in range(2)]
    assert not set(two[0]) & set(two[1])
    one = samples(4, 1, 1, 0, steps=5)  # same global batch on one process
    assert sorted(two[0] + two[1]) == sorted(one)
    # and step by step, not only overall
    for s in range(5):
        assert sorted(two[0][2 * s : 2 * s + 2] + two[1][2 * s : 2 * s + 2]) == one[4 * s : 4 * s + 4]


def test_accumulation_equals_a_bigger_micro_batch():
    assert samples(2, 3, 1, 0, steps=4) == samples(6, 1, 1, 0, steps=4)


def test_resume_continues_at_the_same_sample():
    full = samples(3, 2, 1, 0, steps=7)
    assert samples(3, 2, 1, 0, steps=7, start=4) == full[4 * 6 :]


def test_windows_read_the_magic_prime_positions(tmp_path):
    data = BinIdx(write_corpus(tmp_path / "c", 5000))
    ds = TrainWindows([data], ctx_len=16, seed=3)
    (prime,) = ds.primes
    assert prime == magic_prime(5000, 16)
    tokens = np.asarray(data.tokens)
    for n in (0, 1, 7, prime + 2):
        x, y = ds[n]
        start = window_start(n, prime, 16, 3)
        assert x.tolist() == tokens[start : start + 16].tolist()
        assert y.tolist() == tokens[start + 1 : start + 17].tolist()
    starts = {window_start(n, prime, 16, 3) for n in range(prime)}
    assert starts == {16 * i for i in range(prime)}  # one pass covers every window once


def test_validation_windows_are_consecutive_and_split_across_ranks(tmp_path):
    data = BinIdx(write_corpus(tmp_path / "c", 1000))
    whole = ValWindows(data, ctx_len=10, max_tokens=200)
    assert len(whole) == 20
    tokens = np.asarray(data.tokens)
    x, y = whole[3]
    assert x.tolist() == tokens[30:40].tolist() and y.tolist() == tokens[31:41].tolist()
    parts = [ValWindows(data, 10, 200, rank=r, world=3) for r in range(3)]
    assert sorted(w for p in parts for w in p.windows) == list(range(20))


def test_vocab_check_uses_the_sidecar_or_scans(tmp_path):
    import json

    import pytest

    from rwkv_train.data.build import sidecar_path
    from rwkv_train.data.windows import check_vocab, max_token_id
    from rwkv_train.errors import DataError

    data = BinIdx(write_corpus(tmp_path / "c", 3000, vocab=200))
    top = int(np.asarray(data.tokens).max())
    assert max_token_id(data) == top  # no sidecar: scanned
    check_vocab(data, top + 1, "corpus")
    with pytest.raises(DataError, match=f"holds token id {top} but model.vocab_size is {top}"):
        check_vocab(data, top, "corpus")
    sidecar_path(data.prefix).write_text(json.dumps({"max_token_id": 7}))
    assert max_token_id(data) == 7  # recorded by make_binidx: no scan
    check_vocab(data, 65536, "corpus")  # uint16 ids always fit a 65536 vocabulary
