"""benchmarks/gpu_step.py's CPU dry mode runs, without datasets / jsonargparse / reasoning-gym / math-verify."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow  # a subprocess runs the benchmark

# the GPU image lacks these packages: importing any of them is an error in this run
BLOCKER = """
import importlib.abc, runpy, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('datasets', 'jsonargparse', 'reasoning_gym', 'math_verify'):
            raise ImportError('gpu_step must not import ' + name)
sys.meta_path.insert(0, Block())
sys.argv = ['gpu_step.py', '--device', 'cpu', '--shape', 'tiny', '--precision', PRECISION]
runpy.run_path('benchmarks/gpu_step.py', run_name='__main__')
"""


@pytest.mark.parametrize("precision,weights", [("32-true", "bfloat16"), ("bf16-mixed", "float32")])
def test_gpu_step_dry_mode_runs_real_steps_without_optional_packages(precision, weights):
    code = BLOCKER.replace("PRECISION", repr(precision))
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [ln for ln in res.stdout.splitlines() if ln.startswith("| tiny |")]
    arms = {ln.split("|")[2].strip(): ln for ln in rows}
    assert {"flow", "uniform", "hf", "hf_static", "hf_paged"} <= set(arms)
    step_s = float(arms["flow"].split("|")[3])
    share, uniform_share = (float(arms[a].split("|")[10].strip().rstrip("%")) for a in ("flow", "uniform"))
    # uniform's callback runs too (a fraction of a millisecond, so 0.0-0.1% by timing); flow adds its graph
    assert step_s > 0 and share > 0 and 0 <= uniform_share < share
    assert "estimated" in res.stdout and "total" in res.stdout
    assert f"precision {precision} over {weights} weights" in res.stdout
