"""scripts/cpu_targets.sh (issue 31's measurements on a CPU kind): its dry run names this CPU kind's
results files, and every option it passes to a benchmark is one that benchmark's argparse declares."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest
from conftest import ROOT

from flowtracer.generation.precision import cpu_kind

pytestmark = pytest.mark.slow  # a subprocess runs the script (its interpreter imports torch)


def test_cpu_targets_dry_run_names_kind_files_and_only_real_benchmark_options():
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable}
    res = subprocess.run(["bash", "scripts/cpu_targets.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    steps = [shlex.split(line[2:]) for line in res.stdout.splitlines() if line.startswith("+ ")]
    kind = cpu_kind()
    outputs = {word for step in steps for word in step if word.startswith("results/")}
    assert outputs == {f"results/{name}_{kind}.md" for name in ("decode", "prefill", "step_vs_trl", "demo")}
    benchmarks = [step for step in steps if len(step) > 1 and step[1].startswith("benchmarks/")]
    assert [b[1] for b in benchmarks] == ["benchmarks/decode.py", "benchmarks/prefill.py", "benchmarks/step_vs_trl.py"]
    for step in benchmarks:  # read from the source: a --help subprocess per benchmark costs seconds of imports
        accepted = set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", (ROOT / step[1]).read_text()))
        for option in (word for word in step if word.startswith("--")):
            assert option in accepted, f"{step[1]} has no option {option}"
