"""The exported models at run time (no torch): settings, ONNX encoder, CTC head, prompt, llama.cpp decoder."""
