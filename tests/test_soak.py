"""Soak, short: 40 RL steps on a tiny model with FlowCredit; resident memory must not keep growing.

The 300-step version with the reported slope is `benchmarks/soak.py`. Here the bound is loose (a
leak of one step's rollouts, attention map or graph per step would exceed it within 40 steps
only if large; the benchmark's slope is the fine measurement), so allocator noise cannot fail it.
"""

from __future__ import annotations

import pytest
from soaking import soak


@pytest.mark.slow
def test_short_soak_memory_is_flat(tmp_path):
    r = soak(40, str(tmp_path))
    assert r["steps"] == 40
    assert r["slope_mib_per_step"] < 0.5, r
    assert r["rss_end_mib"] - r["rss_start_mib"] < 40, r
