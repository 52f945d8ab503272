#!/bin/sh
# Wheels that benchmarks/gpu_check.py needs on the device machine (Python 3.12, its own CUDA torch, no network) and
# that its image lacks (checked against /work/.library/device/KINDS.md). Run here, in the repo root; then carry .whl
# and .gpu-data in the device call:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
#   python3 benchmarks/gpu_check.py --data-dir .gpu-data --out $OUT --skip-default-run
# Ray (74 MB) does not fit the device tool's 64 MiB carry limit, so the whole `medfed simulate` comparison
# (gpu_check's last part) needs a GPU machine with medfed installed: run it there without --skip-default-run.
set -e
grep -qx '/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude
mkdir -p .whl .gpu-data
cp ../shared/data/medmnist/*.npz .gpu-data/
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d .whl opacus==1.6.0 monai==1.6.1 nibabel==5.4.2 pydicom==3.0.2 cryptography==50.0.2 cffi pycparser
du -sh .whl .gpu-data
