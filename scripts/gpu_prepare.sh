#!/usr/bin/env bash
# Prepares, on this machine, what scripts/gpu_bench.sh needs on a lent CUDA machine that cannot
# download: the tokenizer in .gpu/tokenizer, and mlx[cuda] (mlx, mlx-cuda-13, mlx-lm wheels for
# CPython 3.12) in two parts, since one device call carries at most 64 MiB and mlx-cuda-13 is
# 90 MB: .whl1/part1 (the wheel's first 60 MB) and .whl2/ (the rest and the two small wheels).
# All three folders are added to .git/info/exclude, so they travel only when a call carries them.
#
#   bash scripts/gpu_prepare.sh        # from the repo root, with network access to PyPI
#
# Then, on the device (docs/benchmarks.md, "Running on a lent GPU"):
#   call 1, carry [".whl1"]:  mkdir -p /tmp/mlxw && cp .whl1/part1 /tmp/mlxw/
#   call 2 at once (the machine stays warm ~30 s), carry [".gpu", ".whl2"]:
#     W=/tmp/mlxw/$(cat .whl2/name); cat /tmp/mlxw/part1 .whl2/part2 > $W &&
#     python3 -m pip install -q --no-index --no-deps --target /tmp/site $W .whl2/*.whl &&
#     export PYTHONPATH=/tmp/site; DEADLINE=... bash scripts/gpu_bench.sh $OUT
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
part1=60000000  # bytes: beside the repo's files, under one call's 64 MiB
head -c "$part1" "$tmp/$cuda_wheel" >.whl1/part1
tail -c +$((part1 + 1)) "$tmp/$cuda_wheel" >.whl2/part2
echo "$cuda_wheel" >.whl2/name
cat .whl1/part1 .whl2/part2 | cmp - "$tmp/$cuda_wheel"
mv "$tmp"/mlx-*.whl "$tmp"/mlx_lm-*.whl .whl2/
rm -rf "$tmp"
du -sh .gpu .whl1 .whl2
