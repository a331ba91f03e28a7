"""The fused Triton kernels (flowtracer.model.kernels) against their torch twins.

On a GPU box they run on CUDA; here they run on CPU tensors through Triton's interpreter
(TRITON_INTERPRET=1, which must be set before triton is imported: hence a subprocess). The
interpreter has no bfloat16 arithmetic, so the map is checked in float16 here; bfloat16 on CUDA is
checked by `benchmarks/gpu_attention.py` (its correctness table).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow  # a subprocess under the Triton interpreter

SCRIPT = r"""
import sys, torch
sys.path.insert(0, "tests")
from flowtracer.model import kernels
from flowtracer.model.capture import capture_attention
from flowtracer.model.forward import teacher_forced_pass
from tiny import tiny_model
assert kernels._INTERPRET and kernels.triton is not None

torch.manual_seed(0)
logits, tok = torch.randn(7, 300) * 3, torch.randint(0, 300, (7,))
lp, ent = kernels.token_stats(logits, tok, 1 / 0.7)
ref = torch.log_softmax(logits.double() / 0.7, -1)
torch.testing.assert_close(lp.double(), ref.gather(-1, tok[:, None]).squeeze(-1), atol=1e-5, rtol=0)
torch.testing.assert_close(ent.double(), -(ref.exp() * ref).sum(-1), atol=1e-5, rtol=0)

# head_dim 16 (tl.dot's minimum), GQA 4:2, left padding in one row, 70 tokens = two 64-row tiles
model = tiny_model("llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=2).half()
ids = torch.randint(3, 90, (2, 70))
mask = torch.ones_like(ids)
mask[1, :5] = 0
fused = teacher_forced_pass(model, ids, mask, capture_layers="all", backend="triton", temperature=0.8)
twin = teacher_forced_pass(model, ids, mask, capture_layers="all", backend="torch", temperature=0.8)
assert fused.attn.abs().sum() > 0 and twin.attn.abs().sum() > 0
torch.testing.assert_close(fused.attn, twin.attn, atol=1e-5, rtol=0)
torch.testing.assert_close(fused.logprobs, twin.logprobs, atol=2e-3, rtol=0)
torch.testing.assert_close(fused.entropy, twin.entropy, atol=2e-3, rtol=0)
print("kernels agree")
"""


def test_triton_kernels_match_torch_twins():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "kernels agree" in res.stdout
