#!/usr/bin/env bash
# Build llama-cpp-python with CUDA as a wheel HERE (a machine with nvcc 13 and no GPU), so that the GPU
# machine installs it instead of compiling for most of its short time (tests/gpu/run.sh).
#
#   - CUDA for one architecture only, as SASS (CMAKE_CUDA_ARCHITECTURES=90-real: H100 and H200 are
#     both sm_90; no PTX, which would double libggml-cuda.so), flash-attention kernels off
#     (GGML_CUDA_FA=OFF: half the build time and size), no driver library (GGML_CUDA_NO_VMM=ON: the
#     toolkit here has no libcuda stub);
#   - the CPU backend with GGML_NATIVE=OFF and the AVX2/FMA/F16C/BMI2 set only: no -march=native,
#     no AVX-512, no AMX, no run-time CPU variants (GGML_BACKEND_DL/CPU_ALL_VARIANTS off), so what
#     the building host's CPU has never ends up in the wheel (the H200's build of 2026-12-01 used
#     GGML_NATIVE=ON on a host with AMX);
#   - cuBLAS 13 from the nvidia-cublas wheel (the toolkit here has none), only to compile and link:
#     at run time the library needs libcublas.so.13, libcublasLt.so.13 and libcudart.so.13 on the
#     loader's path (a CUDA 13 image has them in /usr/local/cuda/lib64);
#   - debug symbols stripped.
#
# The wheel is cached in $FUNASR_GPU_CACHE (default ~/.cache/funasr-nano-gpu/, outside the repo) under
# a build tag that says what it is: llama_cpp_python-<v>-1cu130sm90-py3-none-linux_x86_64.whl.
# Takes about 25-30 minutes with 2 jobs under `nice -n 19` (BUILD_JOBS, default 2).
#
# usage: bash tests/gpu/build_wheel.sh SDIST    (prints the wheel's path on its last line)
set -euo pipefail
cd "$(dirname "$0")/../.."
SDIST="$(realpath "${1:?usage: build_wheel.sh SDIST}")"
LLAMA_VERSION="$(sed -n 's/^llama-cpp-python==\([0-9.]*\).*/\1/p' requirements.txt)"
CACHE="${FUNASR_GPU_CACHE:-$HOME/.cache/funasr-nano-gpu}"
ARCH="${CUDA_ARCH:-90}"
CUBLAS_VERSION=13.0.2.14          # the cuBLAS of CUDA 13.0 (the nvcc here and the H200's toolkit)
TAG="1cu130sm${ARCH}"
WHEEL="$CACHE/llama_cpp_python-$LLAMA_VERSION-$TAG-py3-none-linux_x86_64.whl"
if [ -f "$WHEEL" ]; then echo "$WHEEL"; exit 0; fi

NVCC="$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)"
[ -x "$NVCC" ] || { echo "build_wheel.sh: no nvcc here (CUDA 13 toolkit needed)" >&2; exit 2; }
PY="${PYTHON:-python3}"

# cuBLAS headers and libraries from PyPI (420 MB wheel, cached): the toolkit here lacks them.
cublas="$CACHE/cublas-$CUBLAS_VERSION"
if [ ! -f "$cublas/nvidia/cu13/lib/libcublas.so.13" ]; then
  mkdir -p "$CACHE/dl"
  "$PY" -m pip download -q --no-deps --only-binary=:all: "nvidia-cublas==$CUBLAS_VERSION" -d "$CACHE/dl"
  rm -rf "$cublas.tmp" && "$PY" -m zipfile -e "$CACHE"/dl/nvidia_cublas-"$CUBLAS_VERSION"-*.whl "$cublas.tmp"
  mv "$cublas.tmp" "$cublas"
fi
inc="$cublas/nvidia/cu13/include"
lib="$cublas/nvidia/cu13/lib"

work="$CACHE/build-$TAG"
rm -rf "$work" && mkdir -p "$work/out"
log="$CACHE/build-$TAG.log"
echo "building llama-cpp-python $LLAMA_VERSION with CUDA for sm_$ARCH ($(nvcc --version | tail -1)); log: $log" >&2

# CUDA::cublas / CUDA::cublasLt are found through these cache entries (FindCUDAToolkit's find_library
# keeps a preset value); the headers come in through the compile flags (CMAKE_ARGS is split on
# blanks: no blank inside one argument).
args=(
  -DGGML_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=${ARCH}-real" -DGGML_CUDA_FA=OFF -DGGML_CUDA_NO_VMM=ON
  -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=OFF -DGGML_CPU_ALL_VARIANTS=OFF
  -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_SSE42=ON
  -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX_VNNI=OFF
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
  -DLLAVA_BUILD=OFF -DCMAKE_BUILD_TYPE=Release
  "-DCUDA_cublas_LIBRARY=$lib/libcublas.so.13" "-DCUDA_cublasLt_LIBRARY=$lib/libcublasLt.so.13"
  "-DCMAKE_CUDA_FLAGS=-I$inc" "-DCMAKE_CXX_FLAGS=-I$inc"
  "-DCMAKE_CUDA_COMPILER=$NVCC"
)
start=$(date +%s)
CMAKE_ARGS="${args[*]}" CMAKE_BUILD_PARALLEL_LEVEL="${BUILD_JOBS:-2}" \
  SKBUILD_BUILD_DIR="$work/build" SKBUILD_INSTALL_STRIP=true \
  nice -n 19 "$PY" -m pip wheel -v --no-deps --no-cache-dir -w "$work/out" "$SDIST" > "$log" 2>&1 \
  || { tail -30 "$log" >&2; echo "build_wheel.sh: build failed, see $log" >&2; exit 3; }
echo "built in $(( $(date +%s) - start )) s" >&2
cp "$work/build/CMakeCache.txt" "$CACHE/CMakeCache-$TAG.txt" 2>/dev/null || true

# Repack under the tag (tests/gpu/repack_wheel.py): only the libraries a load reads, stripped,
# RUNPATH $ORIGIN alone.
built=$(ls "$work"/out/llama_cpp_python-"$LLAMA_VERSION"-*.whl)
"$PY" tests/gpu/repack_wheel.py "$built" "$WHEEL.tmp"
mv "$WHEEL.tmp" "$WHEEL"
rm -rf "$work"  # the build folder (140 MB); its CMakeCache.txt is kept beside the wheel
ls -la "$WHEEL" >&2
echo "$WHEEL"
