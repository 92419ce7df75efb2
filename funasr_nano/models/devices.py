"""Which devices run the models: llama.cpp's GPU offload and onnxruntime's execution providers."""

from __future__ import annotations

import logging

log = logging.getLogger("funasr_nano.engine")

GPU_LLAMA_HINT = ("for a GPU build of llama.cpp: CMAKE_ARGS=\"-DGGML_CUDA=on\" pip install --force-reinstall "
                  "--no-cache-dir llama-cpp-python==0.3.36 (or -DGGML_VULKAN=on)")
GPU_ONNX_HINT = "for the encoder on an NVIDIA GPU: pip install onnxruntime-gpu"


def gpu_setup() -> tuple[int, list[str] | None]:
    """(n_gpu_layers, ONNX providers): offload everything that has a GPU backend; log what runs on the CPU."""
    import onnxruntime as ort

    from funasr_nano.models.llm import gpu_offload_supported

    llama_gpu = gpu_offload_supported()
    available = ort.get_available_providers()
    gpu_providers = [p for p in ("CUDAExecutionProvider", "ROCMExecutionProvider", "DmlExecutionProvider",
                                 "CoreMLExecutionProvider") if p in available]
    if not llama_gpu and not gpu_providers:
        log.warning("no GPU found (llama.cpp has no GPU backend, onnxruntime no GPU provider): running on the CPU; "
                    "%s; %s", GPU_LLAMA_HINT, GPU_ONNX_HINT)
    elif not llama_gpu:
        log.warning("this llama.cpp build has no GPU backend: the decoder runs on the CPU; %s", GPU_LLAMA_HINT)
    elif not gpu_providers:
        log.warning("onnxruntime has no GPU execution provider: the encoder runs on the CPU; %s", GPU_ONNX_HINT)
    providers = gpu_providers + ["CPUExecutionProvider"] if gpu_providers else None
    return (-1 if llama_gpu else 0), providers


__all__ = ["GPU_LLAMA_HINT", "GPU_ONNX_HINT", "gpu_setup"]
