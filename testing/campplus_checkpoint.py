"""Build release-shaped CAM++ checkpoints (`iic/speech_campplus_sv_zh-cn_16k-common`) for the tests.

No model hub is reachable where the tests run. This writes a folder in the release's layout
(`config.yaml`, `configuration.json`, a float32 `campplus_cn_common.bin` holding the state dict with
the official key names) that funasr's `AutoModel(model=DIR)` (what `spk_model="cam++"` resolves to)
and our exporter load as they would load the release. The network is the release's full shape
(about 7 M parameters, 28 MB: small enough to build and run at full size).

The weights are random: funasr's own initialisation (Kaiming normal convolutions, seeded) plus
random batch-norm statistics and affine parameters, so that every normalisation in the graph does
real arithmetic (the release's running means and variances are far from 0 and 1; leaving torch's
defaults would let an export that dropped a batch norm pass). Embeddings of such a network still
depend on the input smoothly, which is all the parity tests need.

Usage: python -m testing.campplus_checkpoint OUT_DIR [--seed N]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# The release's config.yaml as funasr reads it (`model: CAMPPlus` and its constructor's arguments,
# which are also CAMPPlus's defaults). The layout of the ModelScope folder (config.yaml,
# configuration.json, campplus_cn_common.bin) and these values are quoted in public write-ups of the
# model folder; funasr resolves the weights through configuration.json's `file_path_metas`.
RELEASE_CONFIG_YAML = """\
# network architecture
model: CAMPPlus
model_conf:
    feat_dim: 80
    embedding_size: 192
    growth_rate: 32
    bn_size: 4
    init_channels: 128
    config_str: 'batchnorm-relu'
    memory_efficient: True
    output_level: 'segment'
"""

WEIGHTS_FILE = "campplus_cn_common.bin"

CONFIGURATION_JSON = {
    "framework": "pytorch",
    "task": "speaker-verification",
    "model": {"type": "cam++-sv",
              "model_config": {"sample_rate": 16000, "fbank_dim": 80, "emb_size": 192},
              "pretrained_model": WEIGHTS_FILE},
    "pipeline": {"type": "speaker-verification"},
    "file_path_metas": {"init_param": WEIGHTS_FILE, "config": "config.yaml"},
}


def build_campplus_checkpoint(out_dir: Path | str, seed: int = 0) -> Path:
    """Write the release layout into `out_dir` (created) and return it."""
    import torch
    import yaml
    from funasr.models.campplus.model import CAMPPlus

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(RELEASE_CONFIG_YAML, encoding="utf-8")
    with open(out / "configuration.json", "w", encoding="utf-8") as f:
        json.dump(CONFIGURATION_JSON, f, indent=4)
    conf = yaml.safe_load(RELEASE_CONFIG_YAML)["model_conf"]
    torch.manual_seed(seed)
    model = CAMPPlus(**conf)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(0.3 * torch.randn(n, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(n, generator=gen))
                if module.affine:
                    module.weight.copy_(0.6 + 0.8 * torch.rand(n, generator=gen))
                    module.bias.copy_(0.1 * torch.randn(n, generator=gen))
                module.num_batches_tracked.fill_(1000)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out / WEIGHTS_FILE)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_campplus_checkpoint(args.out_dir, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
