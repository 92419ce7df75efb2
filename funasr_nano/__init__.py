"""Fun-ASR-Nano without PyTorch at run time: ONNX encoder + GGUF Qwen3 decoder.

Packages along the data path: `audio` (files, features, VAD, cuts), `models` (settings, ONNX
encoder and CTC head, prompt, the llama.cpp binding), `decoding` (the scheduler that owns the
llama.cpp sequences), `output` (results, alignment, subtitles, writers); `engine` wires them and
`presets` holds the configuration table. They import only numpy, onnxruntime, llama_cpp and light
audio libraries; torch lives in `export` (release, ONNX and GGUF exporters) only.
"""
