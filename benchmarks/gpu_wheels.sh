#!/usr/bin/env bash
# Download, on a machine with PyPI, the wheels that benchmarks/gpu_check.sh installs on a GPU machine
# with no network (Python 3.12, x86-64, torch already there). They land in .whl/, ignored by git
# through .git/info/exclude; the device tool carries them with `carry: [".whl"]`.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> "$(git rev-parse --git-common-dir)/info/exclude"
platforms=()
for n in 28 27 17; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
# torchtune 0.6.1 imports datasets, omegaconf, torchdata and torchao at import time; math-verify needs
# latex2sympy2_extended and the antlr4 4.13 runtime; Liger-Kernel is the peer of the log-prob benchmark.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl \
  torchtune==0.6.1 torchao==0.14.1 torchdata==0.11.0 omegaconf==2.4.0 antlr4-python3-runtime==4.13.2 \
  math-verify==0.9.0 latex2sympy2_extended==1.11.0 liger-kernel==0.8.5 \
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 kagglehub==1.0.3 blobfile==3.3.0
du -sh .whl
