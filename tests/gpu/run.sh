#!/usr/bin/env bash
# The GPU check, on a machine with an NVIDIA GPU and no network (what tests/gpu/prepare.sh made travels
# in .gpu-carry/): install the carried wheels, build llama-cpp-python with CUDA for this GPU's
# architecture only (skipped when an earlier run on the same machine built it), then run
# tests/gpu/check.py at the real Qwen3-0.6B shapes. Results: $OUT/report.json, $OUT/report.md, logs.
#
# usage: bash tests/gpu/run.sh        (OUT defaults to /tmp/funasr-gpu-check-out)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/funasr-gpu-check-out}"
SITE=/tmp/funasr-gpu-site
mkdir -p "$OUT" "$SITE"
export PYTHONPATH="$SITE" PYTHONUNBUFFERED=1
export PATH="$PATH:/usr/local/cuda/bin"
start=$(date +%s)
nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
  .gpu-carry/wheels/*.whl || exit 2

if ! python3 -c 'import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 1)' 2>/dev/null; then
  arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '. ')
  echo "building llama-cpp-python with CUDA for sm_${arch:=90} ($(nproc) jobs)"
  CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$arch -DLLAVA_BUILD=OFF -DGGML_NATIVE=ON" \
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    python3 -m pip install -v --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade \
      --target "$SITE" .gpu-carry/llama_cpp_python-*-trimmed.tar.gz > "$OUT/build.log" 2>&1
  rc=$?
  tail -5 "$OUT/build.log"
  [ $rc -eq 0 ] || { echo "build failed ($rc), see build.log"; exit 3; }
fi
echo "set-up took $(( $(date +%s) - start )) s"

# Triage of a crash at model load (seen on an H200 host, 2026-12-01: SIGSEGV inside llama.cpp's
# print_info, at its first std::stringstream): which C++ runtime the library resolves, and whether
# a plain load survives with the GPU hidden or with the compiler's own libstdc++ preloaded.
{
  python3 --version; g++ --version | head -1; nvcc --version | tail -1
  ldd "$SITE"/llama_cpp/lib/libllama.so | grep -E 'stdc\+\+|gcc_s|libgomp|cudart|cublas'
  load='import sys; from funasr_nano.models.llm import LlamaDecoder; LlamaDecoder(sys.argv[1]); print("load ok")'
  tiny=.gpu-carry/model/qwen3-0.6b-asr.gguf
  for mode in default no-gpu preload-libstdc++; do
    case $mode in
      default) env=() ;;
      no-gpu) env=(CUDA_VISIBLE_DEVICES=) ;;
      preload-libstdc++) env=(LD_PRELOAD="$(g++ -print-file-name=libstdc++.so.6)") ;;
    esac
    env "${env[@]}" python3 -X faulthandler -c "$load" "$tiny" > /tmp/funasr-load.log 2>&1
    echo "load ($mode): exit $?"; tail -4 /tmp/funasr-load.log
  done
} 2>&1 | tee "$OUT/triage.log"

python3 -m tests.gpu.check --shape full --model .gpu-carry/model --out "$OUT/report.json" --log "$OUT/steps.log" | tee "$OUT/report.md"
rc=${PIPESTATUS[0]}
echo "whole check took $(( $(date +%s) - start )) s"
exit "$rc"
