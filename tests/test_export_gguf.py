"""02_export_gguf.py / funasr_nano.export.export_gguf: the Qwen3 GGUF must behave exactly like the Hugging Face model.

Reference: transformers' Qwen3ForCausalLM built from the same bf16 weights (as
f32). llama.cpp runs with an f32 KV cache and no flash attention so that only
the GGUF's storage format differs from the reference.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from funasr_nano.export.export_gguf import (
    ExportError,
    Qwen3Params,
    export_gguf,
    gguf_file_name,
    parse_types,
    plan_tensors,
    read_qwen3_params,
)
from funasr_nano.export.release import load_state_dict, sub_state_dict
from funasr_nano.models.gguf_file import read_gguf
from tests.llama_helpers import GGUFModel, capture_llama_log

# the Hugging Face reference of the parity tests (export requirements); CI fails on the skip (testing/ci_rules.py)
torch = pytest.importorskip("torch", reason="pip install torch==2.13.0 && pip install -r requirements.txt")
transformers = pytest.importorskip("transformers", reason="pip install torch==2.13.0 && pip install -r requirements.txt")

REPO = Path(__file__).resolve().parents[1]
TYPES = ("f32", "f16", "bf16", "q8_0", "q4_k_m")
LLM_SUBDIR = "Qwen3-0.6B"

CHATML = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n语音转写："
    "<|im_end|>\n<|im_start|>assistant\n"
)
TOKENIZER_CASES = [
    CHATML,
    "<|im_start|>user\n语音转写成英文，不进行文本规整：<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    "今天天气很好，我们去公园散步吧。北京时间2024年3月15日，新华社记者报道。",
    "Hello world! It's 3.14159 -- don't panic; e-mail me at test@example.com   (spaces)\n\n\ttab",
    "混合 text 和 English，数字 12345 与标点！？……「引号」",
    "<|endoftext|>开头 and <|im_end|> in the middle <|im_start|>",
]
# A longer teacher-forcing text for the quantization agreement figures.
LONG_TEXT = (
    CHATML + "北京时间今天上午，国家统计局发布数据显示，一季度国内生产总值同比增长百分之五点三。"
    "Meanwhile, the weather in Hangzhou stays warm and sunny, with temperatures around 25 degrees. "
    "专家表示，消费和投资继续保持稳定增长，市场预期总体向好。<|im_end|>"
)
# Log lines that mean the file is incomplete or misread by llama.cpp.
BAD_LOG_PATTERNS = (
    "unknown pre-tokenizer",
    "GENERATION QUALITY WILL BE DEGRADED",
    "missing",
    "unknown model architecture",
    "failed",
    "error",
    "not found",
    "is not in special_eog_ids",
    "falling back",
)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def release_dir(tiny_ckpt: Path) -> Path:
    """The release-shaped checkpoint every test here uses (conftest's session `tiny`, CTC head included).

    Swap point: any `build_checkpoint(...)` folder with the `tiny` LLM shape works.
    """
    return tiny_ckpt


@pytest.fixture(scope="module")
def gguf_paths(release_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf_out")
    paths = export_gguf(release_dir, out, TYPES, progress=False)
    return dict(zip(TYPES, paths))


@pytest.fixture(scope="module")
def hf_model(release_dir: Path):
    """transformers' Qwen3 with the checkpoint's bf16 weights in f32 (what the GGUF must reproduce)."""
    config = transformers.Qwen3Config.from_pretrained(release_dir / LLM_SUBDIR)
    config._attn_implementation = "eager"
    model = transformers.Qwen3ForCausalLM(config).eval()
    state = {k: v.float() for k, v in sub_state_dict(load_state_dict(release_dir), "llm").items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected
    assert set(missing) <= {"lm_head.weight"}  # tied to the embeddings
    model.tie_weights()
    return model


@pytest.fixture(scope="module")
def hf_tokenizer(release_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(release_dir / LLM_SUBDIR)


@pytest.fixture(scope="module")
def f32_model(gguf_paths: dict[str, Path]):
    with GGUFModel(gguf_paths["f32"]) as model:
        yield model


def hf_logits(model, ids: list[int] | None = None, embeds: torch.Tensor | None = None) -> np.ndarray:
    with torch.no_grad():
        if embeds is not None:
            out = model(inputs_embeds=embeds[None])
        else:
            out = model(torch.tensor([ids]))
    return out.logits[0].float().numpy()


def hf_greedy(model, prompt: list[int], n_new: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n_new):
        ids.append(int(hf_logits(model, ids)[-1].argmax()))
    return ids[len(prompt) :]


def teacher_forced_agreement(ref: np.ndarray, got: np.ndarray) -> float:
    return float((ref.argmax(-1) == got.argmax(-1)).mean())


# --------------------------------------------------------------------------- pure helpers


def test_gguf_file_name() -> None:
    assert gguf_file_name("f16") == "qwen3-0.6b-asr.gguf"
    assert gguf_file_name() == "qwen3-0.6b-asr.gguf"
    assert gguf_file_name("q8_0") == "qwen3-0.6b-asr.q8_0.gguf"
    assert gguf_file_name("Q4_K_M") == "qwen3-0.6b-asr.q4_k_m.gguf"


def test_parse_types() -> None:
    assert parse_types("f16, Q8_0,f16") == ("f16", "q8_0")
    for bad in ("f8", "", " , "):
        with pytest.raises(ExportError):
            parse_types(bad)


def _params(tied: bool) -> Qwen3Params:
    return Qwen3Params(
        n_layers=1, n_embd=8, n_ff=16, n_head=2, n_head_kv=1, head_dim=4, n_ctx=64, rope_theta=1e6,
        rms_eps=1e-6, vocab_size=10, tie_word_embeddings=tied,
    )  # fmt: skip


def _tiny_state(head_equal: bool) -> dict[str, torch.Tensor]:
    emb = torch.randn(10, 8)
    state = {
        "model.embed_tokens.weight": emb,
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8),
        "model.layers.0.self_attn.k_proj.weight": torch.randn(4, 8),
        "model.layers.0.self_attn.v_proj.weight": torch.randn(4, 8),
        "model.layers.0.self_attn.o_proj.weight": torch.randn(8, 8),
        "model.layers.0.self_attn.q_norm.weight": torch.ones(4),
        "model.layers.0.self_attn.k_norm.weight": torch.ones(4),
        "model.layers.0.mlp.gate_proj.weight": torch.randn(16, 8),
        "model.layers.0.mlp.up_proj.weight": torch.randn(16, 8),
        "model.layers.0.mlp.down_proj.weight": torch.randn(8, 16),
        "model.layers.0.input_layernorm.weight": torch.ones(8),
        "model.layers.0.post_attention_layernorm.weight": torch.ones(8),
        "model.norm.weight": torch.ones(8),
        "lm_head.weight": emb.clone() if head_equal else torch.randn(10, 8),
    }
    return state


@pytest.mark.parametrize(
    ("tied", "head_equal", "expect_output"),
    [(True, True, False), (True, False, False), (False, True, False), (False, False, True)],
)
def test_plan_tensors_tied_head(tied: bool, head_equal: bool, expect_output: bool) -> None:
    """output.weight is written only for a genuinely separate head; norms stay f32, matrices take the type."""
    plans = {p.gguf_name: p for p in plan_tensors(_tiny_state(head_equal), _params(tied), "f16")}
    assert ("output.weight" in plans) == expect_output
    assert plans["token_embd.weight"].out_type == "f16"
    assert plans["blk.0.attn_q_norm.weight"].out_type == "f32"
    assert plans["output_norm.weight"].out_type == "f32"
    assert len(plans) == 13 + expect_output


def test_plan_tensors_rejects_unknown_and_mismatched() -> None:
    state = _tiny_state(True)
    state["model.layers.0.extra.weight"] = torch.ones(3)
    with pytest.raises(ExportError, match="cannot map"):
        plan_tensors(state, _params(True), "f16")
    state = _tiny_state(True)
    state["model.layers.0.mlp.up_proj.weight"] = torch.randn(12, 8)
    with pytest.raises(ExportError, match="does not match config.json"):
        plan_tensors(state, _params(True), "f16")


def test_read_params_from_config(release_dir: Path, tmp_path: Path) -> None:
    params = read_qwen3_params(release_dir / LLM_SUBDIR)
    assert (params.n_layers, params.n_embd, params.n_head, params.n_head_kv, params.head_dim) == (
        2,
        64,
        4,
        2,
        32,
    )
    assert params.tie_word_embeddings and params.rope_theta == 1e6
    cfg = (release_dir / LLM_SUBDIR / "config.json").read_text()
    (tmp_path / "config.json").write_text(
        cfg.replace('"rope_scaling": null', '"rope_scaling": {"rope_type": "yarn"}')
    )
    with pytest.raises(ExportError, match="yarn"):
        read_qwen3_params(tmp_path)


# --------------------------------------------------------------------------- file contents


def test_metadata_matches_llama_cpp_converter(gguf_paths: dict[str, Path], release_dir: Path) -> None:
    contents = read_gguf(gguf_paths["f16"])
    kv = contents.kv
    expected = {
        "general.architecture": "qwen3",
        "general.file_type": int(gguf.LlamaFileType.MOSTLY_F16),
        "general.quantization_version": gguf.GGML_QUANT_VERSION,
        "qwen3.block_count": 2,
        "qwen3.context_length": 40960,
        "qwen3.embedding_length": 64,
        "qwen3.feed_forward_length": 128,
        "qwen3.attention.head_count": 4,
        "qwen3.attention.head_count_kv": 2,
        "qwen3.attention.key_length": 32,
        "qwen3.attention.value_length": 32,
        "qwen3.rope.freq_base": 1e6,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.eos_token_id": 151645,
        "tokenizer.ggml.padding_token_id": 151643,
        "tokenizer.ggml.bos_token_id": 151643,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_eos_token": False,  # llama.cpp's converter writes both for Qwen3
    }
    for key, value in expected.items():
        assert kv[key] == value, key
    assert kv["qwen3.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert "<|im_start|>" in kv["tokenizer.chat_template"]
    assert kv["general.name"]

    tokens = kv["tokenizer.ggml.tokens"]
    types = kv["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 151936  # one per embedding row
    assert tokens[151645] == "<|im_end|>" and types[151645] == gguf.TokenType.CONTROL
    assert tokens[151668] == "</think>" and types[151668] == gguf.TokenType.USER_DEFINED
    assert tokens[151669] == "[PAD151669]" and types[151669] == gguf.TokenType.UNUSED
    assert types[151935] == gguf.TokenType.UNUSED and types[1000] == gguf.TokenType.NORMAL
    assert len(kv["tokenizer.ggml.merges"]) > 150000

    tensors = contents.tensors
    assert "output.weight" not in tensors  # tied embeddings stay tied
    assert len(tensors) == 1 + 2 * 11 + 1
    assert tensors["token_embd.weight"].ggml_type == gguf.GGMLQuantizationType.F16
    assert tensors["token_embd.weight"].shape == (151936, 64)
    assert tensors["blk.1.ffn_down.weight"].ggml_type == gguf.GGMLQuantizationType.F16
    for name in ("output_norm.weight", "blk.0.attn_norm.weight", "blk.0.attn_q_norm.weight"):
        assert tensors[name].ggml_type == gguf.GGMLQuantizationType.F32


def test_base_types_store_exact_weights(gguf_paths: dict[str, Path], release_dir: Path) -> None:
    """bf16 keeps the checkpoint's bits; f32 is their exact widening."""
    state = sub_state_dict(load_state_dict(release_dir), "llm")
    src = state["model.layers.1.mlp.down_proj.weight"]
    name, n = "blk.1.ffn_down.weight", src.numel()
    bf16 = read_gguf(gguf_paths["bf16"])
    assert bf16.tensors[name].ggml_type == gguf.GGMLQuantizationType.BF16
    assert bf16.kv["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_BF16)
    raw = np.frombuffer(bf16.raw(name, 2 * n), dtype=np.uint16).reshape(src.shape)
    assert np.array_equal(raw, src.view(torch.int16).numpy().view(np.uint16))
    f32 = read_gguf(gguf_paths["f32"])
    assert f32.tensors[name].ggml_type == gguf.GGMLQuantizationType.F32
    assert np.array_equal(
        np.frombuffer(f32.raw(name, 4 * n), dtype=np.float32).reshape(src.shape), src.float().numpy()
    )


def test_quantized_file_types(gguf_paths: dict[str, Path]) -> None:
    for t, ftype in (("q8_0", gguf.LlamaFileType.MOSTLY_Q8_0), ("q4_k_m", gguf.LlamaFileType.MOSTLY_Q4_K_M)):
        kv = read_gguf(gguf_paths[t]).kv
        assert kv["general.file_type"] == int(ftype)
        assert kv["tokenizer.ggml.pre"] == "qwen2"
        assert kv["tokenizer.ggml.eos_token_id"] == 151645
    assert not [
        p for p in gguf_paths["f16"].parent.iterdir() if p.name.endswith(".part") or p.name.startswith(".")
    ]


# --------------------------------------------------------------------------- numerics vs transformers


def test_f32_token_logits_match_transformers(f32_model: GGUFModel, hf_model, hf_tokenizer) -> None:
    ids = hf_tokenizer.encode(LONG_TEXT, add_special_tokens=False)
    ref = hf_logits(hf_model, ids)
    f32_model.reset()
    got = f32_model.decode_tokens(ids)
    assert got.shape == ref.shape
    print(f"\nf32 tokens: max|diff| = {np.abs(got - ref).max():.3g}")
    assert np.abs(got - ref).max() < 1e-3
    assert ref.std() > 1.0  # the random model is not degenerate


def test_f32_injected_embeddings_match_transformers(f32_model: GGUFModel, hf_model, hf_tokenizer) -> None:
    """Prompt tokens, then raw embedding rows (token = NULL, like the audio), then more tokens."""
    prefix = hf_tokenizer.encode(
        CHATML.split("<|im_end|>\n<|im_start|>assistant")[0], add_special_tokens=False
    )
    suffix = hf_tokenizer.encode("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    rng = np.random.default_rng(1)
    audio = (2.0 * rng.standard_normal((9, f32_model.n_embd))).astype(np.float32)
    embed = hf_model.get_input_embeddings().weight.detach()
    embeds = torch.cat([embed[prefix], torch.from_numpy(audio), embed[suffix]])
    ref = hf_logits(hf_model, embeds=embeds)

    f32_model.reset()
    got = np.concatenate(
        [f32_model.decode_tokens(prefix), f32_model.decode_embeddings(audio), f32_model.decode_tokens(suffix)]
    )
    print(f"\nf32 injected embeddings: max|diff| = {np.abs(got - ref).max():.3g}")
    assert np.abs(got - ref).max() < 1e-3

    # The whole prompt as one embedding batch (how the runtime injects it) gives the same logits.
    f32_model.reset()
    one_shot = f32_model.decode_embeddings(embeds.numpy())
    assert np.abs(one_shot - ref).max() < 1e-3

    # The injected rows matter: other "audio" changes what follows.
    f32_model.reset()
    f32_model.decode_tokens(prefix)
    f32_model.decode_embeddings(audio[::-1].copy())
    other = f32_model.decode_tokens(suffix)
    assert np.abs(other[-1] - got[-1]).max() > 0.1


def test_f16_logits_close_and_greedy_equal(
    gguf_paths: dict[str, Path], f32_model, hf_model, hf_tokenizer
) -> None:
    """f16 tolerance: 2% of the logit spread.

    bf16 weights are exact in f16 (fewer mantissa bits, in range), but ggml's CPU
    matmul rounds each activation row to f16 before the dot product (unit
    roundoff 2^-11 ~ 4.9e-4), once per matmul, compounded over the layers and
    amplified by the tiny model's x8 residual branches. Measured here: max diff
    about 0.5% of std(logits); 2% leaves margin yet is far below what would move
    an argmax, and greedy equality is asserted on top.
    """
    ids = hf_tokenizer.encode(LONG_TEXT, add_special_tokens=False)
    ref = hf_logits(hf_model, ids)
    with GGUFModel(gguf_paths["f16"]) as f16:
        got = f16.decode_tokens(ids)
        rel = float(np.abs(got - ref).max() / ref.std())
        print(f"\nf16: max|diff| = {np.abs(got - ref).max():.4g} = {rel:.4f} * std(logits)")
        assert rel < 0.02
        assert teacher_forced_agreement(ref, got) == 1.0

        prompt = hf_tokenizer.encode(CHATML, add_special_tokens=False)
        expected = hf_greedy(hf_model, prompt, 16)
        assert len(set(expected)) > 1  # a continuation that depends on the model, not one repeated token
        assert f16.greedy(prompt, 16) == expected
    assert f32_model.greedy(prompt, 16) == expected


@pytest.mark.parametrize(("qtype", "min_agreement"), [("q8_0", 0.8), ("q4_k_m", 0.4)])
def test_quantized_models_generate(
    gguf_paths: dict[str, Path], f32_model: GGUFModel, hf_tokenizer, qtype: str, min_agreement: float
) -> None:
    """Quantized files load and generate; teacher-forced argmax agreement with f32 is printed and bounded."""
    ids = hf_tokenizer.encode(LONG_TEXT, add_special_tokens=False)
    f32_model.reset()
    ref = f32_model.decode_tokens(ids)
    with GGUFModel(gguf_paths[qtype]) as model:
        got = model.decode_tokens(ids)
        agreement = teacher_forced_agreement(ref, got)
        print(
            f"\n{qtype}: teacher-forced argmax agreement with f32 = {agreement:.3f} over {len(ids)} positions"
        )
        assert agreement >= min_agreement
        out = model.greedy(hf_tokenizer.encode(CHATML, add_special_tokens=False), 8)
        assert len(out) == 8 and all(0 <= t < model.n_vocab for t in out)


# --------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("text", TOKENIZER_CASES)
def test_llama_tokenizer_matches_hf(f32_model: GGUFModel, hf_tokenizer, text: str) -> None:
    assert f32_model.tokenize(text, parse_special=True) == hf_tokenizer.encode(text, add_special_tokens=False)


def test_detokenize_round_trips(f32_model: GGUFModel, hf_tokenizer) -> None:
    text = "今天天气很好，我们去公园散步吧。Speech recognition 语音识别 2024年"
    ids = f32_model.tokenize(text)
    assert f32_model.detokenize(ids) == text
    assert hf_tokenizer.decode(ids) == text
    assert f32_model.detokenize([151645], unparse_special=True) == "<|im_end|>"
    assert f32_model.is_eog(151645) and f32_model.is_eog(151643)


# --------------------------------------------------------------------------- clean load


@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0", "q4_k_m"])
def test_loads_without_warnings(gguf_paths: dict[str, Path], qtype: str) -> None:
    """No llama.cpp complaint about the pre-tokenizer, missing keys or tensors.

    One line is accepted: llama.cpp flags the ordinary BPE token 128247 '</s>' of
    the Qwen vocabulary as "control-looking"; the official Qwen3 GGUFs get the
    same line, it comes from the vocabulary itself.
    """
    with capture_llama_log() as log:
        with GGUFModel(gguf_paths[qtype]) as model:
            model.decode_tokens([151644, 872, 198])
    text = "".join(log)
    assert "print_info: arch" in text  # the capture really saw the load
    bad = [
        line
        for line in text.splitlines()
        if any(p.lower() in line.lower() for p in BAD_LOG_PATTERNS) and "'</s>'" not in line
    ]
    assert not bad, "\n".join(bad)


# --------------------------------------------------------------------------- CLI


# Runs a script as on a machine without network: names do not resolve, no internet address connects
# (loopback still does; the proxy settings are dropped). `python -c OFFLINE script args...`
OFFLINE = """
import errno, runpy, socket, sys
def no_name(*args, **kwargs):
    raise socket.gaierror(socket.EAI_NONAME, "offline: the test blocks the network")
def no_route(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not str(address[0]).startswith(("127.", "::1")):
        raise OSError(errno.ENETUNREACH, "offline: the test blocks the network")
    return connect(self, address)
connect = socket.socket.connect
socket.getaddrinfo = no_name
socket.socket.connect = no_route
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _run_cli(*args: str, timeout: float = 300, offline: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    python = [sys.executable]
    if offline:
        python += ["-c", OFFLINE]
        env = {k: v for k, v in env.items() if k.lower() not in ("https_proxy", "http_proxy", "all_proxy")}
    return subprocess.run(
        [*python, str(REPO / "02_export_gguf.py"), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_cli_exports_f16_and_q8_0(release_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "model-gguf"
    proc = _run_cli("--release-dir", str(release_dir), "--model-dir", str(out), "--types", "f16,q8_0", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert "quantiz" not in proc.stderr.lower()  # llama.cpp's per-tensor log stays off with --quiet
    names = sorted(p.name for p in out.iterdir() if p.suffix == ".gguf")
    assert names == ["qwen3-0.6b-asr.gguf", "qwen3-0.6b-asr.q8_0.gguf"]  # the temporary bf16 source is gone
    assert sorted(p.name for p in out.iterdir()) == [*names, "release.json"]  # which release they came from
    for name in names:
        with capture_llama_log(), GGUFModel(out / name) as model:
            assert model.decode_tokens([151644, 872]).shape == (2, 151936)


def test_cli_not_a_release_folder(tmp_path: Path) -> None:
    (tmp_path / "junk.txt").write_text("x")
    proc = _run_cli("--release-dir", str(tmp_path), "--model-dir", str(tmp_path / "o"), "--quiet")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: ") and "model.pt" in proc.stderr


@pytest.mark.slow
def test_cli_missing_model_dir_without_network(tmp_path: Path) -> None:
    """No release and no network: a one-line `error:` (after modelscope's retry warnings), exit 2, no traceback.

    The network is blocked in the child process, so the test runs (and never downloads) wherever it runs."""
    start = time.monotonic()
    (tmp_path / "absent").mkdir()  # an existing empty --release-dir is a download target
    proc = _run_cli(
        "--release-dir", str(tmp_path / "absent"), "--model-dir", str(tmp_path / "o"), "--quiet", timeout=180,
        offline=True,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0])
    assert "Traceback" not in proc.stderr
    assert elapsed < 120
