#!/usr/bin/env bash
# Prepare what launch/gpu_check.sh needs beyond the GPU image's packages, in .whl/ (git-ignored),
# for the lent machines' Python 3.12 (x86-64, manylinux) and torch 2.11: hydra-core 1.3.2 and
# omegaconf 2.3.0 (pure-Python wheels) and antlr4-python3-runtime 4.9.3 (omegaconf's pin; PyPI
# has only its sdist, so it is built here into a pure-Python wheel). Everything else splitgraph
# imports (torch, numpy, matplotlib, tqdm, scikit-learn, nvidia-ml-py, PyYAML, packaging,
# pytest, pytest-timeout, hypothesis) is in the image (.library/device/KINDS.md).
#
#   launch/gpu_wheels.sh          # here, with access to PyPI; then carry [".whl"]
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
rm -rf .whl
mkdir -p .whl
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl hydra-core==1.3.2 omegaconf==2.3.0
"$py" -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
# Every requirement of the three is either one of them or in the image.
for w in .whl/*.whl; do
  unzip -p "$w" '*/METADATA' | sed -n 's/^Requires-Dist: //p' | grep -v 'extra ==' |
    sed "s|^|  $(basename "$w") needs: |" || true
done
ls -l .whl
