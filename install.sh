#!/usr/bin/env bash
# Install ccrl into the active Python environment, beside the torch it already has.
#
#   1. torch: kept as it is when one is importable (2.11 or newer, CPU or CUDA). Without one,
#      "$CCRL_TORCH" is installed (default torch==2.13.0, the CPU build this release is tested on).
#   2. pip install -e ".[dev]": ccrl and its dependencies, test tools included. The package is pure
#      Python; nothing in this step builds, replaces or downloads torch.
#   3. ccrl kernels build: compiles the ternary C++ kernels against that torch into a cache
#      (policies/kernel_build.py). CCRL_KERNELS=off skips it (no C++ compiler): the package then
#      runs the PyTorch reference of the same arithmetic.
#
# PYTHON names the interpreter (default: python). Every step is printed before it runs.
set -euo pipefail
cd "$(dirname "$0")"
py=${PYTHON:-python}
run() { echo "+ $*"; "$@"; }

if version=$("$py" -c "import torch; print(torch.__version__)" 2>/dev/null); then
  echo "torch $version is installed: keeping it"
else
  run "$py" -m pip install "${CCRL_TORCH:-torch==2.13.0}"
fi
run "$py" -m pip install -e ".[dev]"
case "${CCRL_KERNELS:-}" in
  0|off|no|false) echo "CCRL_KERNELS=${CCRL_KERNELS}: the C++ kernels are not built; the PyTorch reference runs" ;;
  *) run "$py" -m ccrl.cli kernels build ;;
esac
