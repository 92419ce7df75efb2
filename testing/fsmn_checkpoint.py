"""Build release-shaped FSMN-VAD checkpoints (`iic/speech_fsmn_vad_zh-cn-16k-common-pytorch`) for the tests.

No model hub is reachable where the tests run. This writes a folder in the release's layout
(`config.yaml`, `configuration.json`, `am.mvn`, a flat float32 `model.pt` with the official key
names, `encoder.*`) that funasr's `AutoModel(model=DIR)` and our exporter load as they would load
the release. The FSMN is the release's full shape (about 0.4 M parameters: small enough to build
and run at full size).

Two kinds of weights:

- "random": every weight random; the silence score of a frame is then an arbitrary function of
  the features, which exercises the arithmetic, the streaming caches and the end-point logic on
  scores with no structure.
- "energy": random weights around a path that carries the mean normalized log-mel energy of the
  centre frame through every layer (clamped with pairs of ReLUs, smoothed by the first FSMN
  memory), so the silence probability falls as the frame gets louder: speech and silence get
  different scores and the end-point detection really opens and closes segments.

Usage: python -m testing.fsmn_checkpoint OUT_DIR [--kind random|energy] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

# The release's config.yaml (ModelScope iic/speech_fsmn_vad_zh-cn-16k-common-pytorch, funasr >= 1.0
# layout). No hub is reachable here, so its text was put together from two public copies: the
# layout (frontend / model / encoder with their *_conf sections, `model: FsmnVADStreaming`) as the
# release's config.yaml is quoted in a CSDN post on tuning FunASR's VAD ("FunASR搭建语音识别服务和
# VAD检测", csdndoc.com/thread/25929.html), and every value from the config that lovemefan/fsmn-vad
# (GitHub, fsmnvad/config/config.yaml) copied from the release, which agrees with funasr's
# VADXOptions defaults and with the model_conf quoted in the post. Key order and spacing follow
# funasr's release configs; the values are what matters to funasr, which reads it with OmegaConf.
RELEASE_CONFIG_YAML = """\
frontend: WavFrontendOnline
frontend_conf:
    fs: 16000
    window: hamming
    n_mels: 80
    frame_length: 25
    frame_shift: 10
    dither: 0.0
    lfr_m: 5
    lfr_n: 1

model: FsmnVADStreaming
model_conf:
    sample_rate: 16000
    detect_mode: 1
    snr_mode: 0
    max_end_silence_time: 800
    max_start_silence_time: 3000
    do_start_point_detection: True
    do_end_point_detection: True
    window_size_ms: 200
    sil_to_speech_time_thres: 150
    speech_to_sil_time_thres: 150
    speech_2_noise_ratio: 1.0
    do_extend: 1
    lookback_time_start_point: 200
    lookahead_time_end_point: 100
    max_single_segment_time: 60000
    snr_thres: -100.0
    noise_frame_num_used_for_snr: 100
    decibel_thres: -100.0
    speech_noise_thres: 0.6
    fe_prior_thres: 0.0001
    silence_pdf_num: 1
    sil_pdf_ids: [0]
    speech_noise_thresh_low: -0.1
    speech_noise_thresh_high: 0.3
    output_frame_probs: False
    frame_in_ms: 10
    frame_length_ms: 25

encoder: FSMN
encoder_conf:
    input_dim: 400
    input_affine_dim: 140
    fsmn_layers: 4
    linear_dim: 250
    proj_dim: 128
    lorder: 20
    rorder: 0
    lstride: 1
    rstride: 0
    output_affine_dim: 140
    output_dim: 248
"""

# ModelScope's configuration.json of funasr >= 1.0 releases: funasr resolves config.yaml, model.pt and
# the CMVN file through `file_path_metas`.
CONFIGURATION_JSON = {
    "framework": "pytorch",
    "task": "voice-activity-detection",
    "model": {"type": "funasr"},
    "pipeline": {"type": "funasr-pipeline"},
    "model_name_in_hub": {"ms": "iic/speech_fsmn_vad_zh-cn-16k-common-pytorch", "hf": ""},
    "file_path_metas": {"init_param": "model.pt", "config": "config.yaml", "frontend_conf": {"cmvn_file": "am.mvn"}},
}

KINDS = ("random", "energy")
N_MELS = 80
LFR_M = 5
INPUT_DIM = N_MELS * LFR_M
AFFINE_DIM = 140
LINEAR_DIM = 250
PROJ_DIM = 128
LORDER = 20
LAYERS = 4
OUTPUT_DIM = 248
# "energy": the clamp of the centre frame's mean normalized log-mel (am.mvn below maps digital
# silence to about -6.5, quiet noise to about -2, speech to about 0) and the logit slope
ENERGY_LO, ENERGY_HI = -4.0, -1.0
SMOOTH_TAP = 0.02  # the first FSMN memory averages the clamped energy over 20 frames
LOGIT_SLOPE = 2.0


def write_am_mvn(path: Path, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A Kaldi nnet-style CMVN like the release's: per-mel-bin shift and scale, tiled over the 5 LFR frames."""
    shift_bins = -(10.0 + 2.0 * rng.random(N_MELS))
    scale_bins = 0.22 + 0.06 * rng.random(N_MELS)
    shift = np.tile(shift_bins, LFR_M).astype(np.float32)
    scale = np.tile(scale_bins, LFR_M).astype(np.float32)

    def row(values: np.ndarray) -> str:
        return "<LearnRateCoef> 0 [ " + " ".join(f"{v:.8g}" for v in values) + " ]"

    text = "\n".join([
        "<Nnet>",
        f"<Splice> {INPUT_DIM} {INPUT_DIM}",
        "[ 0 ]",
        f"<AddShift> {INPUT_DIM} {INPUT_DIM}",
        row(shift),
        f"<Rescale> {INPUT_DIM} {INPUT_DIM}",
        row(scale),
        "</Nnet>",
        "",
    ])
    path.write_text(text, encoding="utf-8")
    return shift, scale


def _linear(rng: np.random.Generator, n_out: int, n_in: int, bias: bool = True, gain: float = 1.0
            ) -> tuple[np.ndarray, np.ndarray | None]:
    w = (gain / math.sqrt(n_in) * rng.standard_normal((n_out, n_in))).astype(np.float32)
    b = (0.1 * rng.standard_normal(n_out)).astype(np.float32) if bias else None
    return w, b


def random_state(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every weight random; the silence logit biased so that its probability sits near the decision threshold."""
    state: dict[str, np.ndarray] = {}

    def put(name: str, w: np.ndarray, b: np.ndarray | None) -> None:
        state[f"encoder.{name}.weight"] = w
        if b is not None:
            state[f"encoder.{name}.bias"] = b

    put("in_linear1.linear", *_linear(rng, AFFINE_DIM, INPUT_DIM, gain=0.4))
    put("in_linear2.linear", *_linear(rng, LINEAR_DIM, AFFINE_DIM, gain=1.2))
    for i in range(LAYERS):
        put(f"fsmn.{i}.linear.linear", *_linear(rng, PROJ_DIM, LINEAR_DIM, bias=False, gain=1.2))
        state[f"encoder.fsmn.{i}.fsmn_block.conv_left.weight"] = (
            0.04 * rng.standard_normal((PROJ_DIM, 1, LORDER, 1))).astype(np.float32)
        put(f"fsmn.{i}.affine.linear", *_linear(rng, LINEAR_DIM, PROJ_DIM, gain=1.2))
    put("out_linear1.linear", *_linear(rng, AFFINE_DIM, LINEAR_DIM, gain=1.2))
    w, b = _linear(rng, OUTPUT_DIM, AFFINE_DIM, gain=1.5)
    assert b is not None
    b[0] += math.log(OUTPUT_DIM - 1) + 4.0  # p(silence) spread around the decision threshold (0.25)
    put("out_linear2.linear", w, b)
    return state


def energy_state(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random weights plus one path that carries the centre frame's loudness to the silence logit.

    Unit 0 of every layer holds it: in_linear1 averages the centre frame's 80 normalized bins;
    in_linear2 + ReLU make relu(e - lo) and relu(e - hi), whose difference is e clamped to
    [lo, hi] (so the logits stay bounded and funasr's log never sees a probability of exactly 0
    or 1); each FSMN block passes it on (the first one smoothing it over its 20-frame memory);
    out_linear2 turns it into opposite silence / speech logits. The other units stay random.
    """
    state = random_state(rng)
    w1, b1 = state["encoder.in_linear1.linear.weight"], state["encoder.in_linear1.linear.bias"]
    w1[0] = 0.0
    w1[0, 2 * N_MELS:3 * N_MELS] = 1.0 / N_MELS
    b1[0] = 0.0
    w2, b2 = state["encoder.in_linear2.linear.weight"], state["encoder.in_linear2.linear.bias"]
    w2[:2] = 0.0
    w2[0, 0] = w2[1, 0] = 1.0
    b2[0], b2[1] = -ENERGY_LO, -ENERGY_HI
    for i in range(LAYERS):
        lin = state[f"encoder.fsmn.{i}.linear.linear.weight"]
        lin[0] = 0.0
        lin[0, 0], lin[0, 1] = 1.0, -1.0
        conv = state[f"encoder.fsmn.{i}.fsmn_block.conv_left.weight"]
        conv[0] = SMOOTH_TAP if i == 0 else 0.0
        aff_w, aff_b = state[f"encoder.fsmn.{i}.affine.linear.weight"], state[f"encoder.fsmn.{i}.affine.linear.bias"]
        aff_w[:2] = 0.0
        aff_w[0, 0] = 1.0
        aff_b[:2] = 0.0
    o1_w, o1_b = state["encoder.out_linear1.linear.weight"], state["encoder.out_linear1.linear.bias"]
    o1_w[0] = 0.0
    o1_w[0, 0] = 1.0
    o1_b[0] = 0.0
    o2_w, o2_b = state["encoder.out_linear2.linear.weight"], state["encoder.out_linear2.linear.bias"]
    # the carried value v lies in [0, (hi - lo) * (1 + 20 * tap)]; silence and speech logits cross at its middle
    middle = 0.5 * (ENERGY_HI - ENERGY_LO) * (1 + LORDER * SMOOTH_TAP)
    o2_w[:2] = 0.0
    o2_w[0, 0], o2_b[0] = -LOGIT_SLOPE, LOGIT_SLOPE * middle
    o2_w[1, 0], o2_b[1] = LOGIT_SLOPE, -LOGIT_SLOPE * middle
    o2_w[2:] *= 0.3
    o2_b[2:] = -6.0  # the other 246 classes: small, random, still part of the softmax
    return state


def build_fsmn_checkpoint(out_dir: Path | str, kind: str = "energy", seed: int = 0) -> Path:
    """Write the release layout into `out_dir` (created) and return it."""
    import torch

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    (out / "config.yaml").write_text(RELEASE_CONFIG_YAML, encoding="utf-8")
    with open(out / "configuration.json", "w", encoding="utf-8") as f:
        json.dump(CONFIGURATION_JSON, f, indent=4)
    write_am_mvn(out / "am.mvn", rng)
    state = random_state(rng) if kind == "random" else energy_state(rng)
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, out / "model.pt")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--kind", choices=KINDS, default="energy")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_fsmn_checkpoint(args.out_dir, args.kind, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
