"""Mixing corpora by weight: exact ratios, even spreading, O(1) lookup, full coverage per corpus."""

from __future__ import annotations

import csv
from collections import Counter

import numpy as np
import pytest

from rwkv_train.config import from_dict, load_config
from rwkv_train.data.binidx import BinIdx
from rwkv_train.data.mixture import Mixture, slot_counts
from rwkv_train.data.sampling import window_start
from rwkv_train.data.windows import TrainWindows
from rwkv_train.trainer import run
from tests.conftest import tiny_config, write_corpus
from tests.test_resume import KillAfter, Killed


def test_slot_counts_follow_the_weights():
    assert slot_counts([0.7, 0.3], 10) == [7, 3]
    assert sorted(slot_counts([1, 1, 1], 10)) == [3, 3, 4]
    assert sum(slot_counts([1e-9, 1.0], 100)) == 100 and slot_counts([1e-9, 1.0], 100)[0] == 1


def test_every_period_has_the_exact_ratio_and_lookup_matches_counting():
    mix = Mixture([0.5, 0.3, 0.2], period=100)
    seen: Counter = Counter()
    for n in range(1000):
        corpus, j = mix.locate(n)
        assert j == seen[corpus]  # per-corpus numbers are consecutive: 0, 1, 2, ...
        seen[corpus] += 1
        if (n + 1) % 100 == 0:
            assert [seen[i] for i in range(3)] == [5 * (n + 1) // 10, 3 * (n + 1) // 10, 2 * (n + 1) // 10]
    assert mix.drawn(1000) == [500, 300, 200]
    counted = Counter(mix.locate(n)[0] for n in range(1050))  # a partial period, by brute force
    assert mix.drawn(1050) == [counted[i] for i in range(3)]


def test_schedule_is_spread_evenly():
    mix = Mixture([0.9, 0.1], period=100)
    minority = [n for n in range(100) if mix.locate(n)[0] == 1]
    assert np.diff(minority).min() >= 9  # one in ten, never bunched


def test_one_corpus_is_the_plain_order():
    mix = Mixture([3.0])
    assert [mix.locate(n) for n in (0, 5, 123456)] == [(0, 0), (0, 5), (0, 123456)]


def test_windows_come_from_each_corpus_in_its_own_order(tmp_path):
    a = BinIdx(write_corpus(tmp_path / "a", 4000, seed=1))
    b = BinIdx(write_corpus(tmp_path / "b", 9000, seed=2))
    ds = TrainWindows([a, b], ctx_len=16, seed=5, weights=[1.0, 3.0])
    for n in range(40):
        corpus, j = ds.mixture.locate(n)
        data = (a, b)[corpus]
        start = window_start(j, ds.primes[corpus], 16, 5)
        assert ds[n][0].tolist() == np.asarray(data.tokens[start : start + 16]).tolist()


def test_config_accepts_a_prefix_or_a_weighted_list():
    one = from_dict({"data": {"train": "data/x"}, "train": {"max_steps": 1}})
    assert [(c.path, c.weight) for c in one.data.train] == [("data/x", 1.0)]
    two = from_dict({"data": {"train": [{"path": "a", "weight": 0.7}, {"path": "b", "weight": "3e-1"}]},
                     "train": {"max_steps": 1}})
    assert [(c.path, c.weight) for c in two.data.train] == [("a", 0.7), ("b", 0.3)]
    with pytest.raises(Exception, match="data.train.*expected a corpus prefix, or a list of"):
        from_dict({"data": {"train": [{"path": "a", "wieght": 1}]}, "train": {"max_steps": 1}})
    with pytest.raises(Exception, match="weight -1.0 for a: expected a positive number"):
        from_dict({"data": {"train": [{"path": "a", "weight": -1}]}, "train": {"max_steps": 1}})


def test_a_mixed_run_reports_its_realised_ratio_and_resumes(tmp_path, caplog):
    a = write_corpus(tmp_path / "a", 6000, seed=1)
    b = write_corpus(tmp_path / "b", 6000, seed=2)
    path = tiny_config(tmp_path, a, data={"train": [{"path": str(a), "weight": 3}, {"path": str(b), "weight": 1}]},
                       train={"max_steps": 5, "micro_bsz": 4})
    with caplog.at_level("INFO", logger="rwkv_train"):
        run(load_config(path))
    text = caplog.text
    assert "realised mix:" in text and "15 samples = 75.00% (weight 75.00%)" in text
    assert "5 samples = 25.00% (weight 25.00%)" in text
    full = [r["loss"] for r in csv.DictReader((tmp_path / "run" / "metrics.csv").open()) if r["loss"]]
    assert len(full) == 5

    broken = tmp_path / "broken"
    with pytest.raises(Killed):
        run(load_config(path, [f"train.out_dir={broken}", "train.save_every=2"]), callbacks=[KillAfter(3)])
    run(load_config(path, [f"train.out_dir={broken}", "train.save_every=2", "train.resume=auto"]))
    resumed = [r["loss"] for r in csv.DictReader((broken / "metrics.csv").open()) if r["loss"]]
    assert resumed == full
