"""Which corpus each training sample comes from, when a run mixes several corpora by weight.

The weights are turned into a fixed schedule of PERIOD slots (each corpus gets a share of slots
proportional to its weight, at least one), spread evenly by smooth weighted round-robin. Sample n takes
slot n mod PERIOD. For every corpus the schedule also records how many earlier slots of the period went
to it, so the per-corpus sample number of n is known in O(1):

    corpus(n) = slot[n % P],   j(n) = (n // P) * count[corpus] + rank[n % P]

The corpus then reads its own magic-prime window j(n). Everything depends only on n, so the mixture is
deterministic per seed and resumes exactly at any step, and over every P consecutive samples the
realised ratio is exactly count / P (within 1/P of the weights).
"""

from __future__ import annotations

import numpy as np

PERIOD = 10_000


def slot_counts(weights: list[float], period: int = PERIOD) -> list[int]:
    """Slots per corpus: proportional to the weights (largest remainder), each at least one, summing to period."""
    total = float(sum(weights))
    exact = [w / total * period for w in weights]
    counts = [max(1, int(e)) for e in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    i = 0
    while sum(counts) < period:
        counts[by_remainder[i % len(weights)]] += 1
        i += 1
    while sum(counts) > period:  # only when the at-least-one rule overshot: take from the largest
        counts[counts.index(max(counts))] -= 1
    return counts


class Mixture:
    """Maps a global sample number to (corpus index, sample number within that corpus)."""

    def __init__(self, weights: list[float], period: int = PERIOD):
        if not weights or any(not w > 0 for w in weights):
            raise ValueError(f"mixture weights must be positive, got {weights}")
        n = len(weights)
        self.period = period if n > 1 else 1
        self.counts = slot_counts(weights, self.period)
        self.slot = np.empty(self.period, dtype=np.int32)
        self.rank = np.empty(self.period, dtype=np.int64)
        credit, seen = [0] * n, [0] * n
        for s in range(self.period):  # smooth weighted round-robin: every corpus at its even spacing
            for i in range(n):
                credit[i] += self.counts[i]
            pick = max(range(n), key=lambda i: credit[i])
            credit[pick] -= self.period
            self.slot[s], self.rank[s] = pick, seen[pick]
            seen[pick] += 1

    def locate(self, sample: int) -> tuple[int, int]:
        """(corpus, per-corpus sample number) of global sample `sample`."""
        cycle, s = divmod(int(sample), self.period)
        corpus = int(self.slot[s])
        return corpus, cycle * self.counts[corpus] + int(self.rank[s])

    def drawn(self, num_samples: int) -> list[int]:
        """How many of the first `num_samples` samples each corpus supplies."""
        cycles, rest = divmod(int(num_samples), self.period)
        partial = np.bincount(self.slot[:rest], minlength=len(self.counts))
        return [cycles * c + int(p) for c, p in zip(self.counts, partial)]
