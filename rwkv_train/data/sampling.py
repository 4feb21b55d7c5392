"""Which window of the flat token stream each training sample reads.

RWKV-LM cuts the corpus into windows of ctx_len tokens (each sample reads
ctx_len + 1 tokens from a window start, for inputs and shifted targets) and
visits them in a scrambled order with the "magic prime" p:

    window(ii) = (floor(p * 0.618...) * ii**3) mod p

Because p % 3 == 2, 3 does not divide p - 1, so cubing is a bijection modulo
p; multiplying by a non-zero factor is one too. Hence any p consecutive
samples visit every window 0..p-1 exactly once, with no shuffle buffer and no
state beyond the sample counter (which is what makes resuming exact).
"""

from __future__ import annotations

import math

from rwkv_train.errors import ConfigError, DataError

_GOLDEN = (math.sqrt(5) - 1) / 2  # the same float RWKV-LM multiplies by
_MASK64 = (1 << 64) - 1
# Miller-Rabin with these bases is exact for every n < 3.3e24, far beyond any
# number of windows a corpus can have.
_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)


def is_prime(n: int) -> bool:
    """Whether n is prime (deterministic Miller-Rabin, exact for n < 3.3e24)."""
    if n < 2:
        return False
    for p in _MR_BASES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in _MR_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def magic_prime(num_tokens: int, ctx_len: int) -> int:
    """Largest prime p with p % 3 == 2 and p <= num_tokens // ctx_len - 1.

    The "- 1" leaves room for the extra target token: the last window starts
    at (p - 1) * ctx_len and reads ctx_len + 1 tokens, which stays inside the
    corpus.
    """
    if ctx_len < 1:
        raise ConfigError(f"data.ctx_len must be a positive number of tokens, got {ctx_len}")
    if num_tokens < ctx_len + 1:
        raise DataError(
            f"corpus has {num_tokens} tokens, ctx_len {ctx_len} needs at least {ctx_len + 1} "
            "(better many times more); lower data.ctx_len or add data"
        )
    bound = num_tokens // ctx_len - 1
    # Candidates with p % 3 == 2, from the bound down: 2 is the smallest one.
    p = bound - (bound - 2) % 3
    while p >= 2:
        if is_prime(p):
            return p
        p -= 3
    raise DataError(
        f"corpus has {num_tokens} tokens, too few for magic-prime sampling with ctx_len {ctx_len}: "
        f"it needs at least {3 * ctx_len} tokens (better many times more); lower data.ctx_len or add data"
    )


def _splitmix64(x: int) -> int:
    """A well-mixed 64-bit hash of x (the splitmix64 finaliser)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def seed_offset(seed: int, prime: int) -> int:
    """Where in the permutation a seed starts: 0 for seed 0, a hash of the seed otherwise.

    Seed 0 keeps RWKV-LM's exact order (its sample counter starts at 1).
    """
    return 0 if seed == 0 else _splitmix64(seed & _MASK64) % prime


def window_index(sample: int, prime: int, seed: int = 0) -> int:
    """Window (0..prime-1) read by global sample number `sample` (0-based)."""
    sample, prime = int(sample), int(prime)  # Python ints: ii**3 must not overflow
    factor = int(prime * _GOLDEN)
    ii = (sample + 1 + seed_offset(seed, prime)) % prime
    return (factor * ii**3) % prime


def window_start(sample: int, prime: int, ctx_len: int, seed: int = 0) -> int:
    """First token of the window read by `sample`; the sample reads ctx_len + 1 tokens from here."""
    return window_index(sample, prime, seed) * ctx_len
