"""Budget slices: seeded, nested labeled prefixes of a shuffled train split and a disjoint pool.

The order is one permutation of the train lines drawn from `seed`; the labeled set of size N is its
first N entries (so every larger N contains the smaller), and the unlabeled pool is everything after
`pool_start` (at least the largest N), so labeled and pool never overlap.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def shuffled_order(num_examples: int, seed: int) -> np.ndarray:
    """The fixed permutation of train indices for a seed (numpy PCG64, stable across runs)."""
    return np.random.default_rng(seed).permutation(num_examples)


def labeled_indices(num_examples: int, size: int, seed: int, pool_start: int | None = None,
                    where: str = 'train split') -> np.ndarray:
    """The indices of the first `size` examples of the shuffled order."""
    check_labeled(num_examples, size, pool_start, where)
    return shuffled_order(num_examples, seed)[:size]


def check_labeled(num_examples: int, size: int, pool_start: int | None = None,
                  where: str = 'train split') -> None:
    """A labeled slice of `size` must fit before the pool: else an error saying how to fix it."""
    limit = num_examples if pool_start is None else min(pool_start, num_examples)
    if size > limit:
        raise ValueError(f'{where}: a labeled slice of {size} needs {size} examples but only {limit} '
                         f'are available ({num_examples} lines, pool starts at {pool_start}); use a '
                         'smaller N or a larger train file.')


def check_pool(num_examples: int, pool_start: int, where: str = 'unlabeled pool',
               what: str = 'train file') -> None:
    """The pool must hold at least one example after the largest labeled slice."""
    if num_examples <= pool_start:
        raise ValueError(f'{where}: the {what} has {num_examples} lines, none left after the '
                         f'largest labeled slice ({pool_start}).')


def pool_indices(num_examples: int, pool_start: int, seed: int, pool_size: int | None = None
                 ) -> np.ndarray:
    """The unlabeled pool: shuffled indices from `pool_start` on (optionally the first pool_size)."""
    rest = shuffled_order(num_examples, seed)[pool_start:]
    return rest if pool_size is None else rest[:pool_size]


def check_sizes(sizes: Sequence[int]) -> tuple[int, ...]:
    sizes = tuple(sorted(set(int(n) for n in sizes)))
    if not sizes or sizes[0] <= 0:
        raise ValueError(f'budget sizes {sizes} must be positive integers.')
    return sizes
