"""magic_prime and the window permutation."""

from __future__ import annotations

import math

import pytest

from rwkv_train.data.sampling import is_prime, magic_prime, window_index, window_start
from rwkv_train.errors import ConfigError, DataError


def slow_is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


def test_is_prime_matches_trial_division():
    assert [n for n in range(10_000) if is_prime(n)] == [n for n in range(10_000) if slow_is_prime(n)]
    # Carmichael numbers and strong pseudoprimes to small bases are composite.
    for n in (561, 1105, 1729, 2047, 3215031751, 3825123056546413051):
        assert not is_prime(n)
    for p in (2_147_483_647, 1_000_000_007, 2**61 - 1):
        assert is_prime(p)


def test_known_values():
    # By hand: 100 // 10 - 1 = 9; 8 is even, 5 is prime and 5 % 3 == 2.
    assert magic_prime(100, 10) == 5
    # 1000 // 10 - 1 = 99; 98 even, 95 = 5*19, 92 even, 89 prime with 89 % 3 == 2.
    assert magic_prime(1000, 10) == 89
    # 30 // 10 - 1 = 2, and 2 % 3 == 2.
    assert magic_prime(30, 10) == 2
    # Published with RWKV-LM (demo-training-run.sh, README): MiniPile and the Pile.
    assert magic_prime(1498226207, 512) == 2926181
    assert magic_prime(1498226207, 4096) == 365759
    assert magic_prime(332115325534, 4096) == 81082817


@pytest.mark.parametrize("num_tokens,ctx_len", [(100, 10), (5000, 7), (123457, 64), (10**6, 512), (31, 1)])
def test_magic_prime_properties(num_tokens, ctx_len):
    p = magic_prime(num_tokens, ctx_len)
    bound = num_tokens // ctx_len - 1
    assert slow_is_prime(p) and p % 3 == 2 and p <= bound
    assert not any(slow_is_prime(q) and q % 3 == 2 for q in range(p + 1, bound + 1))
    # The last window still has its extra target token inside the corpus.
    assert (p - 1) * ctx_len + ctx_len + 1 <= num_tokens


def test_tiny_corpora():
    message = r"corpus has 10 tokens, ctx_len 10 needs at least 11.*lower data\.ctx_len"
    with pytest.raises(DataError, match=message):
        magic_prime(10, 10)
    with pytest.raises(DataError, match="at least 30"):
        magic_prime(29, 10)  # 29 // 10 - 1 = 1: no prime fits
    with pytest.raises(ConfigError):
        magic_prime(100, 0)


@pytest.mark.parametrize("prime", [2, 5, 11, 17, 89, 1013, 4973])
@pytest.mark.parametrize("seed", [0, 1, 42, 2**40 + 3])
def test_window_index_is_a_permutation(prime, seed):
    # Any run of `prime` consecutive samples visits every window exactly once.
    for start in (0, 7, prime * 3 + 1):
        assert sorted(window_index(s, prime, seed) for s in range(start, start + prime)) == list(range(prime))


def test_window_index_large_prime_has_no_repeats():
    p = 2926181
    got = [window_index(s, p, 11) for s in range(20_000)]
    assert len(set(got)) == len(got) and all(0 <= w < p for w in got)


def test_window_index_repeats_every_prime_samples():
    p = 1013
    assert [window_index(s, p, 5) for s in range(50)] == [window_index(s + p, p, 5) for s in range(50)]


def test_seed_zero_is_rwkv_lm_order():
    # RWKV-LM dataset.py: ii = sample + 1; i = (int(p * (sqrt(5)-1)/2) * ii**3 % p) * ctx_len
    p, ctx_len = 2926181, 512
    factor = int(p * (math.sqrt(5) - 1) / 2)
    for s in (0, 1, 2, 1000, 40320 * 9 + 17):
        assert window_start(s, p, ctx_len) == ((factor * (s + 1) ** 3) % p) * ctx_len


def test_determinism_and_seeds():
    p = 1013
    order = [window_index(s, p, 3) for s in range(p)]
    assert order == [window_index(s, p, 3) for s in range(p)]
    orders = {tuple(window_index(s, p, seed) for s in range(p)) for seed in range(5)}
    assert len(orders) == 5


def test_window_start_scales_index():
    assert window_start(12, 89, 64, seed=9) == window_index(12, 89, seed=9) * 64
