"""Export of the official release (torch and funasr live only here): ONNX encoder + CTC head, GGUF decoder."""
