"""Build of the optional C++ ternary kernels (``policies._ternary``); metadata is in pyproject.toml.

The extension is a ``torch.utils.cpp_extension.CppExtension`` compiled against the exact torch
the runtime uses (``build-system.requires`` pins it). Every ISA path is compiled with
``#pragma GCC target(...)`` inside its own source file and chosen at run time from cpuid, so
the build never uses ``-march=native`` and one build runs on any x86-64 CPU.

If the extension cannot be built (no C++ compiler, no torch in the build environment), the
pure-Python packages still install; a warning is printed and ``policies.packed`` runs its
bit-identical PyTorch reference instead.
"""

import glob
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
WARNING = (
    "WARNING: the ccrl ternary C++ kernels (policies._ternary) were not built: {err}. "
    "The package works without them, using the slower PyTorch reference of the same arithmetic."
)


def _warn(err: BaseException | str) -> None:
    print("\n" + WARNING.format(err=err) + "\n", file=sys.stderr, flush=True)


def _extensions():
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as err:  # noqa: BLE001 - any failure here means "no kernels"
        _warn(f"torch is not importable in the build environment ({err!r})")
        return [], {}

    class OptionalBuildExt(BuildExtension):
        """BuildExtension that turns a failed compile into a warning instead of a failed install."""

        def run(self):
            try:
                super().run()
            except Exception as err:  # noqa: BLE001
                _warn(repr(err))

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as err:  # noqa: BLE001
                _warn(repr(err))

    sources = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "kernels", "*.cpp")))
    flags = [
        "-O3",
        "-fopenmp",            # at::parallel_for is inline OpenMP: the pool torch.set_num_threads sizes
        "-ffp-contract=off",   # no fused multiply-add: the float epilogue must match the reference bit for bit
        "-fno-math-errno",
    ]
    ext = CppExtension(
        "policies._ternary",
        sources=sources,
        include_dirs=[os.path.join(HERE, "kernels")],
        extra_compile_args=flags,
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=False)}


if __name__ == "__main__":
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
