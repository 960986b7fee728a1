#!/usr/bin/env bash
# Prepare what launch/gpu_check.sh needs beyond the GPU image's PyTorch: pure-Python wheels of
# hydra-core, omegaconf and antlr4 (the last built from its sdist), in .whl/ (git-ignored).
#
#   launch/gpu_wheels.sh          # here, with network access to PyPI
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
mkdir -p .whl
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_17_x86_64 -d .whl hydra-core==1.3.2 omegaconf==2.3.0
"$py" -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls .whl
