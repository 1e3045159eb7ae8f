#!/usr/bin/env bash
# Prepare a GPU window: the packages vlens imports that the device image lacks, as Python 3.12 wheels in .whl/.
#
# The lent machines (see the device tool's KINDS.md) have Python 3.12, torch 2.11 with CUDA and transformers
# 5.17, and no network. What `benchmarks/gpu.py` imports beyond that image, measured by importing it here,
# is listed below at the versions of constraints.txt (transformers and huggingface-hub travel too: vlens's
# module paths are verified on transformers 5.23). mistral-common is not installed there: only its
# tokenizer file is read (vlens.families.checkpoints.real_tokenizer), so .whl/site/mistral_common holds that
# file and the package's __init__.py, extracted from the wheel. About 56 MiB: with the repository's ~4.5 MiB
# this stays under the 64 MiB a device call carries.
#
#   bash benchmarks/gpu_prepare.sh     # here, once, from the repository root (needs pip's index)
#
# Then one device call (carry [".whl"], timeout_s 600) runs:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site:$PWD/.whl/site PYTHONUNBUFFERED=1 && \
#     timeout 540 python3 benchmarks/gpu.py 2>$OUT/gpu.log | tee $OUT/gpu.json
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
exclude="$(git rev-parse --git-path info/exclude)"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
PKGS=(
  nnsight==0.8.1 sae-lens==6.54.12 transformer-lens==3.9.0 transformers==5.23.0 huggingface-hub==2.4.0
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 plotly==7.1.0 pydantic==2.14.4 pydantic-core==2.50.5
  annotated-types==0.8.0 typing-inspection==0.4.5 greenlet==3.5.6 zstandard==0.25.0 httpx2==2.17.0
  httpcore2==2.17.0 sniffio==1.3.1 truststore==0.10.5 simple-parsing==0.1.9 docstring-parser==0.18.0
  better-abc==0.0.3 platformdirs==4.14.9 wandb==0.31.0 opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2
  opentelemetry-proto==1.45.2 opentelemetry-semantic-conventions==0.66b2
  opentelemetry-exporter-otlp-proto-http==1.45.2 opentelemetry-exporter-otlp-proto-common==1.45.2
  opentelemetry-exporter-http-transport==0.66b2 opentelemetry-exporter-otlp-common==0.66b2
  googleapis-common-protos==1.76.0
)
mkdir -p .whl/site
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${PKGS[@]}" mistral-common==1.13.1
python3 - <<'EOF'
import glob, zipfile
(whl,) = glob.glob(".whl/mistral_common-*.whl")
with zipfile.ZipFile(whl) as z:
    z.extract("mistral_common/__init__.py", ".whl/site")
    z.extract("mistral_common/data/tokenizer.model.v1", ".whl/site")
EOF
rm .whl/mistral_common-*.whl
du -sh .whl
