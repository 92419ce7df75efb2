"""The test machinery itself: builder checkpoints load in the official funasr code, with our weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from testing.checkpoint import FULL, expected_shapes, shape_for, write_release_files


def test_funasr_transcribes_builder_checkpoint_deterministically(tiny_ckpt: Path, zh_mp3: Path, oracle_factory):
    oracle = oracle_factory(tiny_ckpt)
    first = oracle.run(zh_mp3, max_new_tokens=12)
    second = oracle.run(zh_mp3, max_new_tokens=12)
    assert first.text.strip(), "funasr produced empty text"
    assert len(first.token_ids) == 12
    assert first.token_ids == second.token_ids
    np.testing.assert_array_equal(first.logits, second.logits)
    # the recorded prompt is what the official code builds: 10 s -> 21 audio rows
    assert first.audio_len == 21
    assert first.features.shape[1] == 560


def test_funasr_loads_every_tensor_of_model_pt(any_ckpt: Path, oracle_factory):
    """funasr does not fail on missing keys or wrong shapes, it keeps random weights: check values."""
    oracle = oracle_factory(any_ckpt)
    loaded = oracle.loaded_state()
    saved = torch.load(any_ckpt / "model.pt", weights_only=True)
    assert set(saved) == set(loaded)
    for name, tensor in saved.items():
        assert tuple(loaded[name].shape) == tuple(tensor.shape), name
        assert torch.equal(loaded[name].float(), tensor.float()), name


def test_oracle_runs_on_two_tiny_shapes(tiny_ckpt: Path, tiny2_ckpt: Path, zh_mp3: Path, oracle_factory):
    results = {p.name: oracle_factory(p).run(zh_mp3, max_new_tokens=6) for p in (tiny_ckpt, tiny2_ckpt)}
    a, b = results["tiny"], results["tiny2"]
    assert a.encoder_out.shape[1] != b.encoder_out.shape[1]
    assert a.prompt_embeds.shape[1] != b.prompt_embeds.shape[1]
    for r in (a, b):
        assert np.isfinite(r.logits).all()
        assert r.text.strip()
    assert a.ctc_text is not None and b.ctc_text is None  # tiny has the CTC head, tiny2 does not
    # the adaptor_std option really mimics the release's large adaptor outputs
    assert b.adaptor_out.std() > 10 * a.adaptor_out.std()


def test_different_audio_changes_the_oracle_logits(tiny_ckpt: Path, zh_mp3: Path, oracle_factory):
    oracle = oracle_factory(tiny_ckpt)
    speech = oracle.run(zh_mp3, max_new_tokens=1)
    tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(16000 * 3) / 16000).astype(np.float32)
    other = oracle.run(tone, max_new_tokens=1)
    assert np.abs(speech.logits[0] - other.logits[0]).max() > 0.1 * speech.logits[0].std()


def test_full_shape_table_matches_funasr_module_tree(tmp_path: Path):
    """Names and shapes of the `full` checkpoint equal funasr's FunASRNano at the release config.

    The model is built on the meta device, so nothing of its 1 B parameters is allocated.
    """
    import funasr.models.fun_asr_nano.model  # noqa: F401  registers FunASRNano
    import funasr.models.llm_asr.adaptor  # noqa: F401
    import funasr.models.sense_voice.model  # noqa: F401
    from funasr.register import tables
    from omegaconf import OmegaConf

    ctc_vocab = write_release_files(tmp_path, FULL, ctc=True)
    assert ctc_vocab == 60515
    conf = OmegaConf.to_container(OmegaConf.load(tmp_path / "config.yaml"))
    conf["llm_conf"]["init_param_path"] = str(tmp_path / conf["llm_conf"]["init_param_path"])
    conf["dataset_conf"]["ctc_tokenizer_conf"]["vocab_path"] = str(tmp_path / "multilingual.tiktoken")
    with torch.device("meta"):
        model = tables.model_classes.get("FunASRNano")(input_size=560, **conf)
    official = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ours = expected_shapes(FULL, ctc=True)
    assert ours == official

    # and the table states the documented Fun-ASR-Nano dimensions
    assert ours["audio_encoder.encoders0.0.self_attn.linear_q_k_v.weight"] == (1536, 560)
    assert sum(k.startswith("audio_encoder.encoders.") and k.endswith("norm1.weight") for k in ours) == 49
    assert sum(k.startswith("audio_encoder.tp_encoders.") and k.endswith("norm1.weight") for k in ours) == 20
    assert ours["audio_adaptor.linear1.weight"] == (2048, 512)
    assert ours["audio_adaptor.blocks.1.feed_forward.w_1.weight"] == (256, 1024)
    assert ours["llm.model.layers.27.self_attn.q_proj.weight"] == (2048, 1024)
    assert ours["llm.model.layers.27.self_attn.k_proj.weight"] == (1024, 1024)
    assert ours["llm.model.layers.0.mlp.down_proj.weight"] == (1024, 3072)
    assert ours["ctc.ctc_lo.weight"] == (60515, 512)
    n_params = sum(int(np.prod(s)) for k, s in ours.items() if k != "llm.lm_head.weight")
    assert 800e6 < n_params < 900e6, n_params


@pytest.mark.parametrize("size", ["tiny", "tiny2"])
def test_tiny_shapes_are_small(size: str):
    shape = shape_for(size)
    table = expected_shapes(shape, ctc=False)
    besides_embedding = sum(int(np.prod(s)) for k, s in table.items() if "embed_tokens" not in k and "lm_head" not in k)
    assert besides_embedding * 2 < 5e6  # a few MB of bf16 besides the 151936-row table
