#!/usr/bin/env bash
# Pack spconv + its pure-Python helpers for a lent GPU machine that cannot reach any registry.
#
#   bash tools/pack_spconv_for_device.sh            # -> device_carry/spconv_site.tar.xz
#
# Downloads the CPython 3.12 x86-64 wheels (the GPU machine's python3 is 3.12) of spconv-cu126
# 2.3.8, cumm-cu126 0.7.11 and the packages they need that the GPU image lacks (pccm, ccimport,
# fire, lark, termcolor), unpacks them into one folder and packs it as a tar.xz under the
# git-ignored folder device_carry/ (about 42 MiB). Nothing here is committed. On the GPU machine
# (run with carry ["device_carry/spconv_site.tar.xz"]):
#
#   mkdir -p /tmp/spsite && tar -xJf device_carry/spconv_site.tar.xz -C /tmp/spsite
#   PYTHONPATH=/tmp/spsite:$PWD python3 benchmarks/device_check.py
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CARRY="$ROOT/device_carry"
WORK="${TMPDIR:-/tmp}/scott_spconv_pack"  # wheels + unpacked tree stay out of the carried folder
WHEELS="$WORK/wheels"
SITE="$WORK/site"
PY="${PYTHON:-python3}"

PACKAGES=(
  "spconv-cu126==2.3.8"
  "cumm-cu126==0.7.11"
  "pccm==0.4.16"
  "ccimport==0.4.4"
  "fire==0.7.1"
  "lark==1.3.1"
  "termcolor==3.3.0"
)

mkdir -p "$WHEELS" "$CARRY"
for pkg in "${PACKAGES[@]}"; do
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d "$WHEELS" "$pkg"
done

rm -rf "$SITE"
mkdir -p "$SITE"
for whl in "$WHEELS"/*.whl; do
  "$PY" -m zipfile -e "$whl" "$SITE"
done
# Sources and headers for JIT builds are not needed to run the prebuilt kernels.
find "$SITE" -name "__pycache__" -type d -prune -exec rm -rf {} +

tar -C "$SITE" -cJf "$CARRY/spconv_site.tar.xz" .
ls -l "$WHEELS" "$CARRY/spconv_site.tar.xz"
size=$(stat -c %s "$CARRY/spconv_site.tar.xz")
echo "packed $((size / 1048576)) MiB (a device call carries at most 64 MiB in all)"
