#!/usr/bin/env bash
# Prepares what scripts/gpu_bench.sh needs on a CUDA machine without network access: the
# tokenizer in .gpu/tokenizer, and the mlx[cuda] wheels (mlx, mlx-cuda-13, mlx-lm for CPython
# 3.12) in .whl1/ and .whl2/. The 90 MB mlx-cuda-13 wheel is split in two, .whl1/part1 (its
# first 60 MB) and .whl2/part2 (the rest, beside the two small wheels): the split is optional,
# for machines with a size limit on uploads; elsewhere copy both folders at once. The three
# folders are added to .git/info/exclude, so git leaves them out.
#
#   bash scripts/gpu_prepare.sh        # from the repo root, with network access to PyPI
#
# Then copy .gpu, .whl1 and .whl2 into the repo root on the GPU machine (with a size limit on
# uploads: .whl1 first, its part1 moved to /tmp/mlxw, then .gpu and .whl2) and run there
# (docs/benchmarks.md, "scripts/gpu_bench.sh"):
#   mkdir -p /tmp/mlxw && cp .whl1/part1 /tmp/mlxw/    # unless already moved
#   W=/tmp/mlxw/$(cat .whl2/name); cat /tmp/mlxw/part1 .whl2/part2 > $W &&
#     python3 -m pip install -q --no-index --no-deps --target /tmp/site $W .whl2/*.whl &&
#     export PYTHONPATH=/tmp/site; bash scripts/gpu_bench.sh OUT   # DEADLINE=<s>: a time limit
set -euo pipefail
cd "$(dirname "$0")/.."
MLX_VERSION=${MLX_VERSION:-$(python3 -c "import importlib.metadata as m; print(m.version('mlx'))")}
MLX_LM_VERSION=${MLX_LM_VERSION:-$(python3 -c "import importlib.metadata as m; print(m.version('mlx-lm'))")}
for folder in .gpu .whl1 .whl2; do
    grep -qx "/$folder/" .git/info/exclude 2>/dev/null || echo "/$folder/" >>.git/info/exclude
done
rm -rf .gpu .whl1 .whl2 && mkdir -p .gpu .whl1 .whl2
cp -r "${TOKENIZER:-../shared/tokenizers/cosmo2}" .gpu/tokenizer
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$tmp" "mlx==$MLX_VERSION" "mlx-cuda-13==$MLX_VERSION" "mlx-lm==$MLX_LM_VERSION"
cuda_wheel=$(cd "$tmp" && ls mlx_cuda_13-*.whl)
part1=60000000  # bytes: with the repo's files, under a 64 MiB upload limit
head -c "$part1" "$tmp/$cuda_wheel" >.whl1/part1
tail -c +$((part1 + 1)) "$tmp/$cuda_wheel" >.whl2/part2
echo "$cuda_wheel" >.whl2/name
cat .whl1/part1 .whl2/part2 | cmp - "$tmp/$cuda_wheel"
mv "$tmp"/mlx-*.whl "$tmp"/mlx_lm-*.whl .whl2/
rm -rf "$tmp"
du -sh .gpu .whl1 .whl2
