"""Fun-ASR-Nano without PyTorch at run time: ONNX encoder + GGUF Qwen3 decoder.

Packages along the data path: `audio` (files, features, VAD, cuts), `models` (settings, ONNX
encoder and CTC head, prompt, the llama.cpp binding), `decoding` (the scheduler that owns the
llama.cpp sequences), `output` (results, alignment, subtitles, writers); `engine` wires them and
`presets` holds the configuration table. They import only numpy, onnxruntime, llama_cpp and light
audio libraries; torch lives in `export` (release, ONNX and GGUF exporters) only.

The command lines: `funasr-nano` (`__main__`: transcribe, serve, mic, corpus, export, download) and
the numbered scripts of a checkout call the same parsers (`cli`, `options`, `server.cli`,
`realtime.client`, `corpus.cli`, `export.cli`); `requirements` turns a missing extra into one line.
"""

__version__ = "0.1.0"
