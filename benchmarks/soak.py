"""Soak: N RL steps on a tiny random model; does resident memory grow? Prints the RSS slope.

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/soak.py --steps 300

The run itself is tests/soaking.py (tiny Llama, FlowCredit, LoRA, 2 prompts x G=4, 16 new tokens,
validation every 50 steps, RSS read after every step); tests/test_soak.py runs a short version.
The slope is fitted over the second half of the run (the first half includes allocator warm-up).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--max_new_tokens", type=int, default=16)
    args = ap.parse_args()
    from soaking import soak

    with tempfile.TemporaryDirectory() as tmp:
        r = soak(args.steps, tmp, args.max_new_tokens)
    print("| steps | RSS first step (MiB) | RSS last step (MiB) | slope, 2nd half (MiB / 100 steps) |")
    print("| --- | --- | --- | --- |")
    print(f"| {r['steps']} | {r['rss_start_mib']:.1f} | {r['rss_end_mib']:.1f} | {r['slope_mib_per_100_steps']:+.2f} |")
