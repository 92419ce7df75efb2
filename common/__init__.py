"""Fun-ASR-Nano without PyTorch at run time: ONNX encoder + GGUF Qwen3 decoder.

The inference modules (audio, features, encoder, prompt, llm, transcriber, cli,
writers) import only numpy, onnxruntime, llama_cpp and light audio libraries.
torch lives in the export modules (release, export_onnx, export_gguf) only.
"""
