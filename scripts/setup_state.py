"""What ``scripts/setup_env.sh`` can skip on a repeated run, decided without importing torch.

    python scripts/setup_state.py missing REQUIREMENT...  prints the requirements not installed
                                                          (or installed at a version they exclude)
    python scripts/setup_state.py installed               exit 0 if fused_poolformer is installed
                                                          (editable) from this checkout
    python scripts/setup_state.py fresh STAMP             exit 0 if the extension built in place
                                                          matches STAMP; else says what changed
    python scripts/setup_state.py write STAMP             records the current build inputs in STAMP

The stamp lists what the built extension depends on, one item a line: a digest of every
file under csrc/ and of setup.py and pyproject.toml, the torch and Python versions, the
build switches setup.py reads from the environment (every FUSED_POOLFORMER_* variable,
CUDA_HOME, CUDA_PATH, TORCH_CUDA_ARCH_LIST and the compiler variables), the nvcc on PATH,
and -- instead of FUSED_POOLFORMER_CUDA itself -- whether that makes setup.py compile the
CUDA kernels (unset, it does wherever it finds a toolkit, as "1" does).  Delete the stamp
to force a build.
"""

import glob
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import sys
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_FILES = ("setup.py", "pyproject.toml")
SOURCE_DIR = "csrc"
BUILD_VARIABLES = ("CUDA_HOME", "CUDA_PATH", "TORCH_CUDA_ARCH_LIST", "CC", "CXX", "CFLAGS", "CXXFLAGS", "LDFLAGS")
EXTENSION_GLOB = os.path.join("fused_poolformer", "_C*.so")

try:
    from packaging.requirements import Requirement
except ImportError:  # pip vendors it; every venv has pip
    from pip._vendor.packaging.requirements import Requirement


def installed_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing(requirements: List[str]) -> List[str]:
    """The requirements (pip syntax: ``name`` or ``name>=version``) that pip would act on."""
    out = []
    for text in requirements:
        requirement = Requirement(text)
        version = installed_version(requirement.name)
        if version is None or not requirement.specifier.contains(version, prereleases=True):
            out.append(text)
    return out


def sources_digest(root: str) -> str:
    """sha256 over the relative paths and contents of the files the build compiles or reads."""
    paths = [p for p in glob.glob(os.path.join(root, SOURCE_DIR, "**"), recursive=True) if os.path.isfile(p)]
    paths += [os.path.join(root, name) for name in BUILD_FILES if os.path.isfile(os.path.join(root, name))]
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(os.path.relpath(path, root).encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(f.read() + b"\0")
    return digest.hexdigest()


def cuda_kernels(environ: Dict[str, str], nvcc: str) -> str:
    """Whether setup.py compiles the CUDA kernels (its want_cuda): FUSED_POOLFORMER_CUDA "0"
    never, "1" always, anything else (unset included) wherever it finds a toolkit.  Recorded
    instead of the variable itself, so that CI's FUSED_POOLFORMER_CUDA=1 and
    scripts/bench.sh's unset variable are one build on a machine with nvcc."""
    flag = environ.get("FUSED_POOLFORMER_CUDA", "").strip()
    if flag in ("0", "1"):
        return "on" if flag == "1" else "off"
    roots = [environ.get(k) for k in ("CUDA_HOME", "CUDA_PATH") if environ.get(k)]
    found = nvcc != "none" or any(os.path.exists(os.path.join(r, "bin", "nvcc")) for r in roots)
    return "on" if found else "off"


def build_inputs(root: str, environ: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """What the extension built in ``root`` depends on, as name -> value."""
    environ = os.environ if environ is None else environ
    switches = sorted(k for k in environ if k.startswith("FUSED_POOLFORMER_") and k != "FUSED_POOLFORMER_CUDA")
    switches += list(BUILD_VARIABLES)
    nvcc = shutil.which("nvcc", path=environ.get("PATH", "")) or "none"
    inputs = {
        "sources": sources_digest(root),
        "torch": installed_version("torch") or "not installed",
        "python": sys.version.split()[0],
        "nvcc": nvcc,
        "cuda kernels": cuda_kernels(environ, nvcc),
    }
    inputs.update({f"env {k}": environ.get(k, "<unset>") for k in switches})
    return inputs


def render(inputs: Dict[str, str]) -> str:
    return "".join(f"{name}: {value}\n" for name, value in inputs.items())


def parse(text: str) -> Dict[str, str]:
    return dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)


def stale_reasons(stamp: str, root: str, environ: Optional[Dict[str, str]] = None) -> List[str]:
    """Why the extension in ``root`` must be built again ([] where it need not)."""
    if not glob.glob(os.path.join(root, EXTENSION_GLOB)):
        return [f"no {EXTENSION_GLOB} in {root}"]
    if not os.path.isfile(stamp):
        return [f"no stamp {stamp}"]
    with open(stamp) as f:
        recorded = parse(f.read())
    current = build_inputs(root, environ)
    return [f"{name}: {recorded.get(name, '<absent>')} -> {current.get(name, '<absent>')}"
            for name in sorted(set(recorded) | set(current)) if recorded.get(name) != current.get(name)]


def installed_from(root: str) -> bool:
    """Whether ``import fused_poolformer`` (run from elsewhere) finds this checkout's package."""
    spec = importlib.util.find_spec("fused_poolformer")
    origin = spec.origin if spec is not None else None
    return origin is not None and os.path.realpath(origin).startswith(os.path.realpath(root) + os.sep)


def main(argv: List[str]) -> int:
    command, args = (argv[0], argv[1:]) if argv else ("", [])
    if command == "missing":
        print(" ".join(missing(args)))
        return 0
    if command == "installed" and not args:
        return 0 if installed_from(ROOT) else 1
    if command == "fresh" and len(args) == 1:
        reasons = stale_reasons(args[0], ROOT)
        for reason in reasons:
            print(f"fused_poolformer: build needed: {reason}")
        return 1 if reasons else 0
    if command == "write" and len(args) == 1:
        with open(args[0], "w") as f:
            f.write(render(build_inputs(ROOT)))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
