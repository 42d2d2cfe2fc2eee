"""The load scripts' one percentile: linear interpolation between order statistics (numpy's default)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from loadtests._stats import percentile


def test_interpolates_between_the_nearest_order_statistics() -> None:
    values = [40.0, 10.0, 30.0, 20.0]  # unsorted on purpose
    assert percentile(values, 0) == 10.0 and percentile(values, 100) == 40.0
    assert percentile(values, 50) == 25.0  # the median of an even count: halfway between 20 and 30
    assert percentile(values, 90) == pytest.approx(37.0)  # index 2.7: 30 + 0.7 * (40 - 30)
    assert percentile([7.0], 99) == 7.0


def test_agrees_with_numpy_default() -> None:
    rng = random.Random(5)
    for n in (1, 2, 3, 10, 101, 1000):
        values = [rng.expovariate(1.0) for _ in range(n)]
        for p in (0, 1, 25, 50, 90, 95, 99, 99.9, 100):
            assert percentile(values, p) == pytest.approx(float(np.percentile(values, p)), rel=1e-12)


def test_no_values_is_nan_and_p_outside_0_100_is_refused() -> None:
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1.0], 101)
    with pytest.raises(ValueError):
        percentile([1.0], -1)
