"""The fused Triton block equals the PyTorch column loop (run in Triton's interpreter, so no GPU needed).

Skipped where Triton is not installed (CPU-only torch); CUDA installs of torch bring it.
"""
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")]

CHECK = textwrap.dedent("""
    import torch
    from oneshot.methods.sparsegpt import _obs_block_torch
    from oneshot.methods.sparsegpt_kernel import obs_block
    torch.manual_seed(0)
    for width, rows, n, m, p in [(32, 40, 0, 0, 0.5), (24, 37, 2, 4, 0.5), (32, 20, 4, 8, 0.5), (20, 33, 0, 0, 0.7)]:
        x = torch.randn(200, width)
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(
            x.t() @ x / 200 + 0.01 * torch.eye(width))), upper=True)
        W1 = torch.randn(width, rows)
        got = obs_block(W1.clone(), U, torch.diag(U), p, n, m)
        want = _obs_block_torch(W1.clone(), U, torch.diag(U), p, n, m)
        assert torch.equal(got[2], want[2]), (width, rows, n, m)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    print("ok")
""")


def test_fused_block_matches_torch_loop():
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, cwd=root)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]
