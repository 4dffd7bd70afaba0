#!/usr/bin/env bash
# The Python packages bench/gpu_throughput.py needs on a lent GPU machine that its image lacks, as
# wheels for its Python (3.12, x86-64) in .whl/, under the 64 MiB a device call may carry. The image
# brings torch (its own CUDA build: not carried), numpy, pandas, pyarrow, aiohttp, grpcio, rich, ...
# Ray's wheel loses its Java jar (31 MB; raylaunch starts no Java workers); DeepSpeed has no wheel on
# PyPI and is built here (pure Python: its ops are compiled on first use, there).
#
#   bash bench/gpu_wheels.sh            # once, here; then in the device call, carry .whl and run:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 \
#     && python3 bench/gpu_throughput.py --out $OUT/gpu.json --scratch /tmp/scratch 2>&1 | tee $OUT/gpu.log
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-.venv/bin/pip}"
OUT=.whl
LIMIT_MB=58  # of the 64 MiB a call carries; the checkout is about 2 MB
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf "$OUT" && mkdir -p "$OUT"

# Ray and the packages its dashboard and Train/Tune/Data import that the image does not have (not
# virtualenv or py-spy: runtime_env virtualenvs and the dashboard's profiler, unused); what
# raylaunch's driver and workers import beyond those (pydantic, hjson for DeepSpeed).
PACKAGES=(
  ray==2.60.0 jsonschema jsonschema-specifications referencing rpds-py
  aiohttp_cors colorful opencensus opencensus-context google-api-core googleapis-common-protos proto-plus
  google-auth cachetools pyasn1 pyasn1-modules rsa
  opentelemetry-api opentelemetry-sdk opentelemetry-proto opentelemetry-exporter-prometheus
  opentelemetry-semantic-conventions importlib-metadata
  smart_open tensorboardX
  pydantic pydantic-core annotated-types typing-inspection hjson
)
"$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d "$OUT" "${PACKAGES[@]}"
"$PIP" wheel -q --no-deps -w "$OUT" deepspeed==0.19.8

# Ray without its Java jar: rewrite the wheel without it (RECORD keeps listing it; pip does not check).
ray_wheel=$(ls "$OUT"/ray-*.whl)
python3 - "$ray_wheel" <<'EOF'
import os, sys, zipfile
path = sys.argv[1]
slim = path + ".slim"
with zipfile.ZipFile(path) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
    for item in src.infolist():
        if not item.filename.startswith("ray/jars/"):
            dst.writestr(item, src.read(item.filename))
os.replace(slim, path)
EOF
total=$(du -cm "$OUT"/*.whl | tail -1 | cut -f1)
ls -la "$OUT"
echo "$OUT: ${total} MB"
if [ "$total" -gt "$LIMIT_MB" ]; then echo "over ${LIMIT_MB} MB: the device call cannot carry it with the checkout" >&2; exit 1; fi
