"""The official implementation as a test oracle: funasr's `FunASRNano` on a local folder.

Every parity test compares against what this returns. It loads the folder with
`funasr.AutoModel` fully offline (local path, no update check, dither 0, 2 CPU
threads) and records, through hooks that do not change the computation:
the LFR features, the encoder and adaptor outputs, the prompt ids and
embeddings, the generated token ids and the LLM's last-position logits after
the prompt and after every generated token.

Random weights make the LLM repeat one token, so equal token ids prove little;
parity tests compare the logits.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("MODELSCOPE_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@dataclass
class OracleResult:
    """What funasr computed for one input, as numpy arrays (batch dimension removed)."""

    text: str
    token_ids: list[int]
    features: np.ndarray  # (T_lfr, n_mels * lfr_m): the frontend output fed to the encoder
    encoder_out: np.ndarray  # (T_lfr, enc_dim)
    adaptor_out: np.ndarray  # (T_lfr, llm_hidden), before the cut to the official row count
    prompt_ids: list[int]  # the prompt's token ids, 0 at the audio positions
    audio_start: int  # first audio position in the prompt
    audio_len: int  # number of audio rows fed to the LLM
    prompt_embeds: np.ndarray  # (P, llm_hidden): exactly what the LLM got as inputs_embeds
    logits: np.ndarray  # (1 + n_generated, vocab): row 0 after the prompt, row i after token i
    ctc_text: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class FunASROracle:
    """A loaded funasr model; call `run` per input. Loading takes seconds, so tests share one per folder."""

    def __init__(self, model_dir: Path | str, *, ncpu: int = 2, rope: str = "fp32") -> None:
        import funasr.models.fun_asr_nano.model as nano_module
        import torch
        from funasr import AutoModel

        # CTC timestamps need torchaudio's forced_align, which is absent here; the CTC text does not.
        nano_module.forced_align = lambda *args, **kwargs: []
        torch.manual_seed(0)
        with quiet_funasr():
            self.auto = AutoModel(
                model=str(model_dir),
                disable_update=True,
                device="cpu",
                ncpu=ncpu,
                hub="ms",
                frontend_conf={"dither": 0.0},
                disable_pbar=True,
                log_level="ERROR",
            )
        self.model = self.auto.model
        # With llm_conf.llm_dtype bf16 funasr builds the LLM in bf16 and only moves it to the
        # run-time dtype (fp32 by default) inside its first inference_llm call, after the audio
        # rows were already written into bf16 embeddings. The first call would then differ from
        # every later one; settle the LLM in fp32 now so every call is the steady state.
        self.model.llm.to(torch.float32)
        if rope == "fp32":
            _exact_rope(self.model.llm)
        elif rope != "as_loaded":
            raise ValueError(f"rope must be 'fp32' or 'as_loaded', not {rope!r}")
        self.rope = rope
        self.model_dir = Path(model_dir)
        self.tokenizer = self.auto.kwargs["tokenizer"]

    def loaded_state(self) -> dict[str, Any]:
        """The model's parameters after loading, to check funasr really took model.pt's values."""
        return self.model.state_dict()

    def run(
        self,
        audio: str | Path | np.ndarray,
        *,
        language: str | None = None,
        itn: bool = True,
        hotwords: list[str] | None = None,
        max_new_tokens: int = 16,
        min_new_tokens: int | None = None,
    ) -> OracleResult:
        """Transcribe one input (a path, or a 16 kHz float waveform) and return everything recorded."""
        import torch

        model = self.model
        record: dict[str, Any] = {"logits": []}

        original_prepare = model.inference_prepare

        @functools.wraps(original_prepare)
        def prepare(*args: Any, **kwargs: Any) -> Any:
            out = original_prepare(*args, **kwargs)
            inputs_embeds, _contents, batch, source_ids, meta = out
            record["embeds"] = inputs_embeds.detach().float().clone()
            record["source_ids"] = source_ids.detach().clone()
            record["fbank_beg"] = int(batch["fbank_beg"][0, 0])
            record["fake_token_len"] = int(batch["fake_token_len"][0, 0])
            record["encoder_out"] = meta["encoder_out"].detach().float().clone()
            record["adaptor_out"] = meta["audio_adaptor_out"].detach().float().clone()
            return out

        def logits_hook(_module: Any, _inputs: Any, output: Any) -> None:
            record["logits"].append(output.logits[0, -1].detach().float().clone())

        original_encode = model.encode

        @functools.wraps(original_encode)
        def encode(speech: Any, speech_lengths: Any) -> Any:
            # the SenseVoice encoder scales its input in place: keep the frontend output first
            record["features"] = speech.detach().float().clone()
            return original_encode(speech, speech_lengths)

        original_generate = model.llm.generate

        @functools.wraps(original_generate)
        def generate(*args: Any, **kwargs: Any) -> Any:
            ids = original_generate(*args, **kwargs)
            record["ids"] = ids.detach().clone()
            return ids

        cfg: dict[str, Any] = {"language": language, "itn": itn, "hotwords": list(hotwords or []),
                               "max_length": max_new_tokens}
        if min_new_tokens is not None:
            cfg["llm_kwargs"] = {"min_new_tokens": min_new_tokens}
        source: Any = str(audio) if isinstance(audio, (str, Path)) else torch.from_numpy(np.asarray(audio, np.float32))

        model.inference_prepare = prepare
        model.encode = encode
        model.llm.generate = generate
        handle = model.llm.register_forward_hook(logits_hook)
        try:
            with torch.no_grad(), quiet_funasr():
                results = self.auto.generate(input=source, cache={}, batch_size=1, **cfg)
        finally:
            handle.remove()
            del model.inference_prepare
            del model.encode
            del model.llm.generate
        res = results[0]
        n_audio = record["fake_token_len"]
        return OracleResult(
            text=res["text"],
            token_ids=[int(t) for t in record["ids"][0].tolist()],
            features=record["features"][0].numpy(),
            encoder_out=record["encoder_out"][0].numpy(),
            adaptor_out=record["adaptor_out"][0].numpy(),
            prompt_ids=[int(t) for t in record["source_ids"][0].tolist()],
            audio_start=record["fbank_beg"],
            audio_len=n_audio,
            prompt_embeds=record["embeds"][0].numpy(),
            logits=torch.stack(record["logits"]).numpy(),
            ctc_text=res.get("ctc_text"),
            extra={"raw": {k: v for k, v in res.items() if k not in ("timestamps", "ctc_timestamps")}},
        )

    def teacher_forced_logits(self, prompt_embeds: np.ndarray, token_ids: list[int]) -> np.ndarray:
        """LLM logits after the prompt and after each of `token_ids`, in one fp32 forward pass.

        Used to compare our decoder step by step on funasr's own tokens, so a
        single flipped argmax does not derail the comparison.
        """
        import torch

        llm = self.model.llm
        emb = torch.from_numpy(prompt_embeds).float()[None]
        if token_ids:
            tok = llm.get_input_embeddings()(torch.tensor([token_ids])).float()
            emb = torch.cat([emb, tok], dim=1)
        with torch.no_grad():
            out = llm(inputs_embeds=emb.to(llm.dtype))
        n = prompt_embeds.shape[0]
        return out.logits[0, n - 1 :].float().numpy()


def _exact_rope(llm: Any) -> None:
    """Recompute the RoPE inverse frequencies in fp32.

    The release's config.yaml says `llm_conf.llm_dtype: bf16`, so funasr builds the
    LLM in bf16 and `.to(bf16)` rounds the rotary `inv_freq` buffer to bf16; moving
    the model back to fp32 keeps the rounded values (e.g. 0.4217 -> 0.4219). Qwen3
    itself, transformers' fresh model and llama.cpp all use the exact frequencies,
    and llama.cpp's qwen3 graph has no way to load custom ones. The parity tests
    therefore compare against funasr with exact frequencies (`rope="fp32"`), and a
    separate test measures what the as-shipped rounding changes (`rope="as_loaded"`).
    """
    import torch

    rotary = llm.model.rotary_emb
    cfg = llm.config
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rotary.inv_freq.copy_(inv_freq)


@contextlib.contextmanager
def quiet_funasr():
    """funasr prints progress and warnings to stdout/stderr; keep test logs readable."""
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.getLogger().setLevel(level)


@functools.lru_cache(maxsize=8)
def oracle_for(model_dir: str, rope: str = "fp32") -> FunASROracle:
    """One loaded oracle per checkpoint folder (and RoPE mode) for the whole test session."""
    return FunASROracle(model_dir, rope=rope)
