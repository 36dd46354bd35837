"""The CMake build of the operator library (for C++ users) builds and registers the ops."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_library_builds_and_runs(tmp_path):
    build = tmp_path / "build"
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "cmake_build.sh"), str(build)],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lib = build / "libfused_poolformer_ops.so"
    assert lib.exists()
    # Load it into a fresh interpreter that never imports the Python package.
    script = textwrap.dedent(f"""
        import torch, torch.nn.functional as F
        torch.ops.load_library({str(lib)!r})
        x = torch.randn(2, 4, 6, 5, dtype=torch.float64)
        y, mean, rstd = torch.ops.fused_poolformer.pool_mixer_forward(x, None, None, None, None, None, 1, 3, 1e-5)
        n = F.group_norm(x, 1, eps=1e-5)
        ref = x + F.avg_pool2d(n, 3, 1, 1, count_include_pad=False) - n
        assert torch.allclose(y, ref, atol=1e-12), (y - ref).abs().max()
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]
