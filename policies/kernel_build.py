"""Build the ternary C++ kernels against the torch that is installed, once, into a cache.

The kernels (``policies/csrc/*.cpp``) are compiled with ``torch.utils.cpp_extension.load``
on first use, or ahead of it by ``ccrl kernels build`` (the README's install line runs it),
into a cache folder whose name holds everything the binary depends on::

    $CCRL_KERNEL_CACHE  (default $XDG_CACHE_HOME/ccrl/kernels, else ~/.cache/ccrl/kernels)
      torch-<torch version>-py<X.Y>-<machine>-<digest of the sources and flags>/_ternary.so

Why this and not a compiled wheel. A ``setuptools`` extension is compiled in pip's isolated
build environment against whatever torch *that* environment installs: pinning it (as this
project once did, ``torch==2.13.0``) ties the package to one torch and breaks the install beside
a user's own torch (2.11 with CUDA, say); leaving it unpinned makes pip fetch the newest torch
(several GB of CUDA) just to build. Building against the *runtime* torch, as DeepSpeed's op
builder does for its JIT ops, keeps ``pip install`` pure Python and never touches torch:

- the cache is keyed by the torch version (and Python, machine and sources), so upgrading torch
  builds anew instead of loading a binary of another ABI;
- the CPU is not part of the key: each ISA path (scalar, AVX2, AVX-512 VNNI, AMX) is compiled
  with ``#pragma GCC target`` inside its own source file and chosen at run time from cpuid (no
  ``-march=native``), so one build runs on any x86-64 CPU;
- a build goes into a private temporary folder and is renamed into place when it succeeded,
  under an ``fcntl.flock`` lock that the operating system releases if the process dies, so a
  build killed half-way leaves neither a broken binary nor a lock that hangs later imports
  (torch's own ``FileBaton`` would);
- without a C++ compiler or ninja, or with ``CCRL_KERNELS=off``, nothing is compiled and
  ``policies.packed`` runs its PyTorch reference of the same arithmetic (bit-identical, slower),
  after one warning that says why.

Compiling takes about a minute on 2 cores; later imports load the cached binary in
milliseconds.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

NAME = "_ternary"                                   # the module the sources define (PyInit__ternary)
SOURCE_DIR = Path(__file__).resolve().parent / "csrc"
CFLAGS = (
    "-O3",
    "-fopenmp",            # at::parallel_for is inline OpenMP: the pool torch.set_num_threads sizes
    "-ffp-contract=off",   # no fused multiply-add: the float epilogue must match the reference bit for bit
    "-fno-math-errno",
)
LDFLAGS = ("-fopenmp",)
ENV_SWITCH = "CCRL_KERNELS"          # "off" | "0" | "no": never build or load; the reference runs
ENV_CACHE = "CCRL_KERNEL_CACHE"      # the cache root
_STALE_SECONDS = 6 * 3600            # temporary build folders older than this are left-overs of killed builds
_LOADED: dict = {}                   # the module this process loaded: its ops can be registered only once


class KernelBuildError(RuntimeError):
    """The kernels could not be compiled or loaded; the message says why."""


def sources() -> list[Path]:
    """The C++ sources, sorted (``policies/csrc/*.cpp``)."""
    return sorted(SOURCE_DIR.glob("*.cpp"))


def cache_root() -> Path:
    """``$CCRL_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/ccrl/kernels``, else ``~/.cache/ccrl/kernels``."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ccrl" / "kernels"


def build_key() -> str:
    """The cache folder's name: torch version, Python, machine and a digest of sources and flags."""
    h = hashlib.sha256()
    for path in sorted(SOURCE_DIR.glob("*")):
        if path.suffix in (".cpp", ".h"):
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(" ".join(CFLAGS + LDFLAGS).encode())   # tuples: torch's load() appends to the lists it is given
    h.update(str(torch._C._GLIBCXX_USE_CXX11_ABI).encode())
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    return f"torch-{torch.__version__}-py{py}-{platform.machine()}-{h.hexdigest()[:16]}"


def build_dir() -> Path:
    """Where the binary for the running torch lives (it may not exist yet)."""
    return cache_root() / build_key()


def disabled() -> str | None:
    """Why building is switched off by the environment, or None."""
    value = os.environ.get(ENV_SWITCH, "").strip().lower()
    if value in ("0", "off", "no", "false"):
        return f"{ENV_SWITCH}={os.environ[ENV_SWITCH]}"
    return None


def _import(path: Path):
    spec = importlib.util.spec_from_file_location(NAME, path)
    if spec is None or spec.loader is None:
        raise KernelBuildError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)       # registers the ccrl:: ops with torch's dispatcher
    return module


@contextlib.contextmanager
def _locked(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{build_key()}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)    # released by the OS if this process dies
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _remove_stale_builds(root: Path) -> None:
    now = time.time()
    for tmp in root.glob(".build-*"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > _STALE_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)


def _check_toolchain() -> None:
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise KernelBuildError("ninja is not installed (pip install ninja)")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise KernelBuildError(f"no C++ compiler ({cxx!r} not found; install g++ or set CXX)")
    if not sources():
        raise KernelBuildError(f"no C++ sources in {SOURCE_DIR}")


def load(build: bool = True, verbose: bool = False):
    """The compiled kernel module, building it first if needed and ``build`` is true.

    Raises ``KernelBuildError`` saying why when there is no binary for this torch and it cannot
    be built (or ``build`` is false). Loading registers the ``ccrl::ternary_linear`` ops.
    """
    if _LOADED:
        return _LOADED["module"]
    if (why := disabled()) is not None:
        raise KernelBuildError(f"switched off by {why}")
    module = _load(build, verbose)
    _LOADED["module"] = module
    return module


def _load(build: bool, verbose: bool):
    final = build_dir()
    binary = final / f"{NAME}.so"
    if binary.exists():
        return _import(binary)
    if not build:
        raise KernelBuildError(f"not built for torch {torch.__version__} (run `ccrl kernels build`)")
    _check_toolchain()
    root = cache_root()
    with _locked(root):
        if binary.exists():                                   # another process built it meanwhile
            return _import(binary)
        _remove_stale_builds(root)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        print(f"ccrl: compiling the ternary CPU kernels for torch {torch.__version__} "
              f"(once; cached in {final})", file=sys.stderr, flush=True)
        from torch.utils.cpp_extension import load as jit_load

        try:
            module = jit_load(
                name=NAME, sources=[str(p) for p in sources()], extra_include_paths=[str(SOURCE_DIR)],
                extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS), build_directory=str(tmp), verbose=verbose,
                is_python_module=True,
            )
        except Exception as err:  # noqa: BLE001 - a compiler error, reported as one
            shutil.rmtree(tmp, ignore_errors=True)
            lines = [ln for ln in str(err).splitlines() if ln.strip()]
            raise KernelBuildError(f"compiling failed: {lines[-1] if lines else err!r}") from err
        if final.exists():                    # a left-over without a binary (cannot happen under the lock)
            shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return module
