#!/usr/bin/env bash
# The GPU check, on a machine with an NVIDIA GPU and no network (what tests/gpu/prepare.sh made travels
# in .gpu-carry/): install the carried wheels, llama-cpp-python from the CUDA wheel built and checked
# on the preparing machine (sm_90: H100, H200), or, where that wheel is missing, does not fit this GPU
# or cannot load here, built from the carried sdist for this GPU's architecture (the fallback, minutes;
# skipped when an earlier run on the same machine built it). Then a triage of the model load and
# tests/gpu/check.py at the real Qwen3-0.6B shapes. Results: $OUT/report.json, $OUT/report.md, logs.
#
# Needs on the GPU machine: the NVIDIA driver (CUDA 13: r580 or newer), cuBLAS 13 (libcublas.so.13,
# libcublasLt.so.13: a CUDA 13 image has them in /usr/local/cuda/lib64 or, with torch cu130, in its
# Python's site-packages nvidia/cu13/lib; they are too large to carry),
# Python 3 with numpy, onnxruntime, PyYAML, tqdm, jinja2, torch; for the fallback build also g++,
# cmake and nvcc 13 with scikit-build-core.
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
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '. ')
arch=${arch:-90}

# The CUDA 13 libraries the wheel needs: wherever this machine keeps them (the toolkit, the loader's
# cache, a pip-installed nvidia-* package), the carried cudart last.
cuda_dirs=()
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-13*/lib64 \
         $(ldconfig -p 2>/dev/null | sed -n 's/.*libcublas\.so\.13 .*=> \(.*\)\/libcublas\.so\.13$/\1/p') \
         $(python3 -c 'import site, glob; print(*(d for s in site.getsitepackages() for d in glob.glob(s + "/nvidia/*/lib")))' 2>/dev/null); do
  [ -e "$d/libcublas.so.13" ] || [ -e "$d/libcudart.so.13" ] && cuda_dirs+=("$d")
done
cuda_dirs+=("$PWD/.gpu-carry/cuda-lib")
LD_LIBRARY_PATH="$(IFS=:; echo "${cuda_dirs[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
echo "CUDA libraries from: ${cuda_dirs[*]}" | tee -a "$OUT/gpu.txt"

deps=(); for w in .gpu-carry/wheels/*.whl; do case "$(basename "$w")" in llama_cpp_python-*) ;; *) deps+=("$w") ;; esac; done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
  "${deps[@]}" || exit 2

offload_ok() {
  python3 -c 'import llama_cpp as L, sys; ok = L.llama_supports_gpu_offload(); print(L.__file__, "GPU offload:", ok); sys.exit(not ok)'
}
how="an earlier run's build"
if ! offload_ok 2>/dev/null; then
  wheel=$(ls .gpu-carry/wheels/llama_cpp_python-*cu*sm"${arch}"-*.whl 2>/dev/null | head -1)
  if [ -n "$wheel" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$wheel" || exit 2
    if offload_ok > "$OUT/wheel-import.log" 2>&1; then
      how="the carried wheel $(basename "$wheel")"
    else
      echo "the carried wheel does not offload here (building instead):"; tail -3 "$OUT/wheel-import.log"
      echo "(where it says libcublas.so.13: this machine lacks CUDA 13's cuBLAS, which the build needs too)"
    fi
  else
    echo "no carried CUDA wheel for sm_${arch} (.gpu-carry/wheels/llama_cpp_python-*sm${arch}-*.whl)"
  fi
fi
if ! offload_ok 2>/dev/null; then
  # The fallback: the same flags as tests/gpu/build_wheel.sh (never GGML_NATIVE=ON: on the H200 of
  # 2026-12-01 that compiled the host's AMX into the CPU backend), for this GPU's architecture.
  echo "building llama-cpp-python with CUDA for sm_${arch} ($(nproc) jobs)"
  rm -rf "$SITE"/llama_cpp "$SITE"/llama_cpp_python-*
  CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${arch}-real -DGGML_CUDA_FA=OFF -DLLAVA_BUILD=OFF \
-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=OFF -DGGML_CPU_ALL_VARIANTS=OFF -DGGML_AVX512=OFF \
-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    python3 -m pip install -v --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade \
      --target "$SITE" .gpu-carry/llama_cpp_python-*-trimmed.tar.gz > "$OUT/build.log" 2>&1
  rc=$?
  tail -5 "$OUT/build.log"
  [ $rc -eq 0 ] || { echo "build failed ($rc), see build.log"; exit 3; }
  how="a build on this machine"
fi
echo "llama-cpp-python: $how; set-up took $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu.txt"

# Triage of a crash at model load (seen on an H200 host, 2026-12-01, with a build made there with
# GGML_NATIVE=ON: SIGSEGV inside llama.cpp's print_info, at its first std::stringstream): which C++
# runtime the library resolves and the process has mapped before the load, llama.cpp's CPU features,
# and whether a plain load survives with the GPU hidden or with the compiler's libstdc++ preloaded.
{
  python3 --version; g++ --version 2>/dev/null | head -1; nvcc --version 2>/dev/null | tail -1
  for lib in libllama.so libggml-cuda.so.0; do
    echo "ldd $lib:"; ldd "$SITE"/llama_cpp/lib/$lib | grep -E 'stdc\+\+|gcc_s|libgomp|cudart|cublas|not found'
  done
  python3 -c 'import llama_cpp; print(llama_cpp.llama_print_system_info().decode())'
  load='import sys; from funasr_nano.models.llm import DecoderOptions, LlamaDecoder
print("mapped:", sorted({l.split()[-1] for l in open("/proc/self/maps") if "stdc++" in l or "gcc_s" in l}), flush=True)
LlamaDecoder(sys.argv[1], DecoderOptions(n_gpu_layers=-1)); print("load ok")'
  tiny=.gpu-carry/model/qwen3-0.6b-asr.gguf
  for mode in default no-gpu preload-libstdc++; do
    case $mode in
      default) env=() ;;
      no-gpu) env=(CUDA_VISIBLE_DEVICES=) ;;
      preload-libstdc++) env=(LD_PRELOAD="$(g++ -print-file-name=libstdc++.so.6 2>/dev/null)") ;;
    esac
    env "${env[@]}" python3 -X faulthandler -c "$load" "$tiny" > /tmp/funasr-load.log 2>&1
    echo "load ($mode): exit $?"; grep -E "^(load|mapped)|ggml_cuda_init|Device [0-9]|Fatal|File " /tmp/funasr-load.log | head -10
  done
} 2>&1 | tee "$OUT/triage.log"

python3 -m tests.gpu.check --shape full --model .gpu-carry/model --out "$OUT/report.json" --log "$OUT/steps.log" | tee "$OUT/report.md"
rc=${PIPESTATUS[0]}
echo "whole check took $(( $(date +%s) - start )) s"
exit "$rc"
