"""The engine's configuration table: presets, the exported file names, and the KV-cache sizing rule.

The CLI, the notebook, the benchmark and the tests all read these; nothing else spells a file
name or a preset. Cheap to import (no onnxruntime, no llama.cpp), so `--help` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass

from funasr_nano.models.settings import ENCODER_FILE, ENCODER_INT8_FILE

GGUF_STEM = "qwen3-0.6b-asr"
GGUF_F16 = f"{GGUF_STEM}.gguf"
GGUF_Q8_0 = f"{GGUF_STEM}.q8_0.gguf"
GGUF_F32 = f"{GGUF_STEM}.f32.gguf"

DEFAULT_BATCH_SIZE = 4  # segments decoded together in one llama.cpp context
DEFAULT_MAX_NEW_TOKENS = 512
DEFAULT_MAX_SEGMENT_SECONDS = 30.0


@dataclass(frozen=True)
class Preset:
    """One way to run the model: which encoder and GGUF files, and whether to offload to a GPU."""

    script: str
    description: str
    encoder_file: str
    gguf_file: str
    gpu: bool = False
    server_batch: int = 8  # 05_server.py's default --max-batch: sequences decoded together across requests


PRESETS: dict[str, Preset] = {
    "cpu": Preset("03_inference_cpu.py", "CPU: fp32 ONNX encoder + f16 GGUF decoder", ENCODER_FILE, GGUF_F16),
    "cpu-int8": Preset("03_inference_cpu_int8.py", "CPU: int8 ONNX encoder + q8_0 GGUF decoder",
                       ENCODER_INT8_FILE, GGUF_Q8_0),
    "gpu": Preset("03_inference_gpu.py", "GPU: every GGUF layer offloaded, GPU ONNX provider when installed",
                  ENCODER_FILE, GGUF_F16, gpu=True, server_batch=16),
}

PROMPT_TEXT_CELLS = 64  # system turn, task prompt and turn markers around the audio: about 25 tokens
SEGMENT_MARGIN_SECONDS = 2.0  # the VAD pads segments beyond the cut


def context_per_sequence(max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                         max_segment_seconds: float = DEFAULT_MAX_SEGMENT_SECONDS, hotwords: str | int = "") -> int:
    """KV cells per sequence: the prompt text, the audio rows of the longest segment and the new tokens.

    A batch gives each segment its own KV stream of this size (tokens then equal decoding it alone),
    and llama.cpp clears every stream at start, so each cell is resident memory (112 KiB for
    Qwen3-0.6B's f16 cache): size it to the longest segment instead of a fixed prompt allowance.
    Hotwords go into the prompt (with funasr's preamble) at up to one token per character, counted
    twice for safety; `hotwords` is the longest hotwords text a call will send, or its length in
    characters. Rounded up to 256 cells, llama.cpp's padding.
    """
    from funasr_nano.audio.features import audio_token_count, lfr_frame_count
    from funasr_nano.models.prompt import PromptOptions, parse_hotwords, task_prompt

    text = PROMPT_TEXT_CELLS
    words = ["x" * hotwords] if isinstance(hotwords, int) and hotwords > 0 else parse_hotwords(hotwords or "")
    if words:
        text += 2 * (len(task_prompt(PromptOptions(hotwords=words))) - len(task_prompt(PromptOptions())))
    samples = int((max_segment_seconds + SEGMENT_MARGIN_SECONDS) * 16000)
    rows = audio_token_count(lfr_frame_count(samples)) + 4
    return (text + rows + max_new_tokens + 255) // 256 * 256
