"""The one percentile of every load script.

Pure Python on purpose: ``locustfile.py`` imports it inside Locust's gevent-patched process, where nothing
may pull in numpy, torch or the product.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def percentile(values: Iterable[float], p: float) -> float:
    """The ``p``-th percentile (``p`` from 0 to 100) of ``values``, interpolated linearly between the two
    nearest order statistics: with the values sorted as ``x[0] <= ... <= x[n-1]``, it is ``x`` at the
    fractional index ``p / 100 * (n - 1)``. This is numpy's default (``method="linear"``, Hyndman and Fan's
    type 7): p0 is the minimum, p100 the maximum, p50 the median. NaN when there are no values.
    """
    if not 0 <= p <= 100:
        raise ValueError(f"percentile {p} is not between 0 and 100")
    ordered = sorted(values)
    if not ordered:
        return math.nan
    index = p / 100 * (len(ordered) - 1)
    low = math.floor(index)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (index - low)
