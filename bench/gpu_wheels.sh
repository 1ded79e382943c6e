#!/bin/bash
# Build .whl/: what the GPU machine (device tool; Python 3.12, torch 2.11, transformers 5.17, pyarrow,
# fsspec, accelerate, psutil already there: KINDS.md) lacks to run the Ray job itself, within the
# 64 MiB a call may carry. Ray's wheel is 79 MB; its Java jar (32 MB), the dashboard's web client,
# and the libraries the job never imports (rllib, serve, tune, train, llm) are dropped from it, and
# its native binaries' symbol tables stripped.
# Two folders, since a call carries 64 MiB with the working tree (11.5 MB): .whl-job (ray, decord,
# omegaconf, jsonschema: ~49 MB) and .whl (transformers 5.23, as bench/gpu_realsize.sh uses it).
# Install each into .site/ in its own call; .site/ stays on the warm machine between calls:
#   python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target .site .whl-job/*.whl
#   bench/gpu_wheels.sh          # here
set -euo pipefail
cd "$(dirname "$0")/.."
for d in /.whl/ /.whl-job/ /.site/; do grep -qx "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
mkdir -p .whl .whl-job /tmp/lvspec-wheels
get() {  # NAME==VERSION ...: binary wheels for the GPU machine's Python
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux2010_x86_64 -d "$1" "${@:2}"
}
get /tmp/lvspec-wheels ray==2.60.0 decord==0.6.0 omegaconf==2.3.0 jsonschema==4.25.1 \
  jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==0.30.0 transformers==5.23.0
python3 -m pip wheel -q --no-deps -w /tmp/lvspec-wheels antlr4-python3-runtime==4.9.3  # sdist only on PyPI

# Slim ray: unpack, drop what the job cannot use, strip symbols, repack under the same name (RECORD left as is:
# pip installs a wheel whose listed files are missing without complaint).
rm -rf /tmp/lvspec-ray && mkdir /tmp/lvspec-ray
unzip -q /tmp/lvspec-wheels/ray-2.60.0-*.whl -d /tmp/lvspec-ray
(cd /tmp/lvspec-ray/ray && rm -rf jars dashboard/client/build rllib serve tune train llm)
# Ray's native binaries ship their symbol tables; the machine needs only what the dynamic linker reads.
find /tmp/lvspec-ray/ray -type f \( -name '*.so' -o -name gcs_server -o -name raylet \) -exec strip --strip-unneeded {} +
(cd /tmp/lvspec-ray && rm -f /tmp/lvspec-wheels/ray-slim.whl && zip -qr -9 /tmp/lvspec-wheels/ray-slim.whl .)
name=$(basename /tmp/lvspec-wheels/ray-2.60.0-*.whl)
rm -f .whl-job/*.whl && cp /tmp/lvspec-wheels/ray-slim.whl ".whl-job/$name"
for w in /tmp/lvspec-wheels/*.whl; do
  case "$(basename "$w")" in ray-*) ;; transformers-*) cp "$w" .whl/ ;; *) cp "$w" .whl-job/ ;; esac
done
for d in .whl-job .whl; do
  du -b $d/*.whl | sort -n | awk -v d=$d '{printf "%8.1f MB  %s\n", $1/1e6, $2; t += $1} END {printf "%8.1f MB  %s in all (a call carries 67.1 MB = 64 MiB, the tree included)\n", t/1e6, d}'
done
