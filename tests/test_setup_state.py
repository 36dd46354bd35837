"""scripts/setup_state.py: what a repeated scripts/setup_env.sh may skip.  The stamp must
change with every input of the build (sources, build files, torch, Python, the build
switches, the nvcc found) and with nothing else; the requirement check must name exactly
what pip would install."""

import importlib.util
import os
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "setup_state.py")
SETUP_ENV = os.path.join(ROOT, "scripts", "setup_env.sh")
BUILD_STAMP = os.path.join(ROOT, ".venv", "fused_poolformer-build.stamp")

_spec = importlib.util.spec_from_file_location("setup_state", SCRIPT)
setup_state = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(setup_state)


def write(root, relative: str, text: str) -> None:
    path = os.path.join(root, relative)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


@pytest.fixture
def checkout(tmp_path):
    """A checkout with sources, build files, files the build does not read, and a built extension."""
    root = str(tmp_path / "checkout")
    for relative, text in {
        "csrc/ops.cpp": "// ops\n",
        "csrc/cuda/forward.cu": "// forward\n",
        "setup.py": "# setup\n",
        "pyproject.toml": "[project]\n",
        "README.md": "readme\n",
        "tests/test_x.py": "# test\n",
        "fused_poolformer/_C.cpython-311-x86_64-linux-gnu.so": "",
    }.items():
        write(root, relative, text)
    return root


BASE_ENV = {"PATH": "/nonexistent", "HOME": "/root", "FUSED_POOLFORMER_CUDA": "0"}


def stamp_for(root, tmp_path, environ=BASE_ENV) -> str:
    stamp = str(tmp_path / "build.stamp")
    with open(stamp, "w") as f:
        f.write(setup_state.render(setup_state.build_inputs(root, environ)))
    return stamp


def test_sources_digest_follows_the_build_files_only(checkout):
    first = setup_state.sources_digest(checkout)
    write(checkout, "README.md", "edited\n")
    write(checkout, "tests/test_x.py", "# edited\n")
    assert setup_state.sources_digest(checkout) == first
    for relative in ("csrc/cuda/forward.cu", "setup.py", "pyproject.toml"):
        with open(os.path.join(checkout, relative)) as f:
            original = f.read()
        write(checkout, relative, original + "// edited\n")
        assert setup_state.sources_digest(checkout) != first, relative
        write(checkout, relative, original)
        assert setup_state.sources_digest(checkout) == first, relative
    write(checkout, "csrc/new_header.h", "")
    assert setup_state.sources_digest(checkout) != first, "a new source file"
    os.remove(os.path.join(checkout, "csrc/new_header.h"))
    os.rename(os.path.join(checkout, "csrc/ops.cpp"), os.path.join(checkout, "csrc/ops2.cpp"))
    assert setup_state.sources_digest(checkout) != first, "a renamed source file"


def test_a_fresh_stamp_has_no_reasons(checkout, tmp_path):
    stamp = stamp_for(checkout, tmp_path)
    assert setup_state.stale_reasons(stamp, checkout, BASE_ENV) == []
    unrelated = dict(BASE_ENV, HOME="/elsewhere", OMP_NUM_THREADS="2")
    assert setup_state.stale_reasons(stamp, checkout, unrelated) == []


@pytest.mark.parametrize("change,expected", [
    (dict(FUSED_POOLFORMER_CUDA="1"), "cuda kernels: off -> on"),
    (dict(FUSED_POOLFORMER_NATIVE="0"), "env FUSED_POOLFORMER_NATIVE: <absent> -> 0"),
    (dict(TORCH_CUDA_ARCH_LIST="9.0"), "env TORCH_CUDA_ARCH_LIST: <unset> -> 9.0"),
    (dict(CUDA_HOME="/opt/cuda"), "env CUDA_HOME: <unset> -> /opt/cuda"),
    (dict(CXX="clang++"), "env CXX: <unset> -> clang++"),
])
def test_a_changed_build_switch_makes_the_stamp_stale(checkout, tmp_path, change, expected):
    stamp = stamp_for(checkout, tmp_path)
    assert setup_state.stale_reasons(stamp, checkout, dict(BASE_ENV, **change)) == [expected]


def test_nvcc_appearing_on_path_makes_the_stamp_stale(checkout, tmp_path):
    """With FUSED_POOLFORMER_CUDA unset, setup.py builds the CUDA kernels wherever nvcc is."""
    stamp = stamp_for(checkout, tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    nvcc = bin_dir / "nvcc"
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    assert setup_state.stale_reasons(stamp, checkout, dict(BASE_ENV, PATH=str(bin_dir))) == [f"nvcc: none -> {nvcc}"]


def test_cuda_switch_counts_by_what_setup_py_builds(checkout, tmp_path):
    """FUSED_POOLFORMER_CUDA=1 (CI) and the variable unset (scripts/bench.sh) build the same
    extension where nvcc is on PATH: one stamp serves both; "0" does not."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    nvcc = bin_dir / "nvcc"
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    with_nvcc = {"PATH": str(bin_dir), "HOME": "/root"}
    stamp = stamp_for(checkout, tmp_path, dict(with_nvcc, FUSED_POOLFORMER_CUDA="1"))
    assert setup_state.stale_reasons(stamp, checkout, with_nvcc) == []
    assert setup_state.stale_reasons(stamp, checkout, dict(with_nvcc, FUSED_POOLFORMER_CUDA="0")) == [
        "cuda kernels: on -> off"]
    # Without nvcc anywhere, unset means no CUDA kernels, as "0" does.
    no_nvcc = {"PATH": "/nonexistent", "HOME": "/root"}
    stamp = stamp_for(checkout, tmp_path, dict(no_nvcc, FUSED_POOLFORMER_CUDA="0"))
    assert setup_state.stale_reasons(stamp, checkout, no_nvcc) == []
    toolkit = tmp_path / "toolkit"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "bin" / "nvcc").write_text("")
    assert setup_state.stale_reasons(stamp, checkout, dict(no_nvcc, CUDA_HOME=str(toolkit))) == [
        "cuda kernels: off -> on", f"env CUDA_HOME: <unset> -> {toolkit}"]


def test_another_torch_or_source_makes_the_stamp_stale(checkout, tmp_path, monkeypatch):
    stamp = stamp_for(checkout, tmp_path)
    real_version = setup_state.installed_version
    monkeypatch.setattr(setup_state, "installed_version",
                        lambda name: "9.9.9" if name == "torch" else real_version(name))
    torch_before = real_version("torch") or "not installed"
    assert setup_state.stale_reasons(stamp, checkout, BASE_ENV) == [f"torch: {torch_before} -> 9.9.9"]
    monkeypatch.undo()
    write(checkout, "csrc/ops.cpp", "// changed\n")
    [reason] = setup_state.stale_reasons(stamp, checkout, BASE_ENV)
    assert reason.startswith("sources: ")


def test_missing_extension_or_stamp_means_a_build(checkout, tmp_path):
    assert setup_state.stale_reasons(str(tmp_path / "absent.stamp"), checkout, BASE_ENV) == [
        f"no stamp {tmp_path / 'absent.stamp'}"]
    stamp = stamp_for(checkout, tmp_path)
    os.remove(os.path.join(checkout, "fused_poolformer/_C.cpython-311-x86_64-linux-gnu.so"))
    assert setup_state.stale_reasons(stamp, checkout, BASE_ENV) == [
        f"no {os.path.join('fused_poolformer', '_C*.so')} in {checkout}"]


def test_missing_names_what_pip_would_install():
    pytest_version = setup_state.installed_version("pytest")
    assert pytest_version is not None
    requirements = ["pytest", f"pytest>={pytest_version}", "pytest>=10000", "fused-poolformer-absent-package"]
    assert setup_state.missing(requirements) == ["pytest>=10000", "fused-poolformer-absent-package"]


def run_state(*args, **env):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          env=dict(os.environ, **env), timeout=60)


def test_command_line_write_then_fresh(tmp_path):
    """The commands setup_env.sh runs, on this checkout (its extension must be built)."""
    stamp = str(tmp_path / "build.stamp")
    assert run_state("write", stamp, FUSED_POOLFORMER_CUDA="0").returncode == 0
    fresh = run_state("fresh", stamp, FUSED_POOLFORMER_CUDA="0")
    if "no fused_poolformer" in fresh.stdout:
        pytest.skip("the extension is not built in this checkout")
    assert fresh.returncode == 0 and fresh.stdout == ""
    stale = run_state("fresh", stamp, FUSED_POOLFORMER_CUDA="1")
    assert stale.returncode == 1
    assert stale.stdout == "fused_poolformer: build needed: cuda kernels: off -> on\n"
    assert run_state("bogus").returncode == 2


def test_second_setup_run_skips_the_build():
    """Where setup_env.sh set up this checkout for the present environment (CI: scripts/
    test.sh ran it just before pytest), running it again builds nothing."""
    if run_state("fresh", BUILD_STAMP).returncode != 0:
        pytest.skip("no fresh .venv build stamp for this environment (setup_env.sh not run with it)")
    [extension] = [os.path.join(ROOT, "fused_poolformer", f) for f in os.listdir(os.path.join(ROOT, "fused_poolformer"))
                   if f.startswith("_C") and f.endswith(".so")]
    built_at = os.stat(extension).st_mtime_ns
    result = subprocess.run(["bash", SETUP_ENV], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "extension up to date" in result.stdout, result.stdout
    assert os.stat(extension).st_mtime_ns == built_at


def test_installed_means_imported_from_this_checkout(checkout):
    """The tests import this checkout's package (tests/helpers.py puts it first on sys.path)."""
    assert setup_state.installed_from(ROOT)
    assert not setup_state.installed_from(checkout)
