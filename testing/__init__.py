"""Test and benchmark fixtures (torch and funasr live here, never on the inference path).

- `checkpoint`: release-shaped checkpoints with random weights, in tiny and full shapes;
- `oracle`: the official funasr `FunASRNano` run offline on them, recording every stage;
- `reference`: plain greedy decoding of one prompt, written independently of `funasr_nano.decoding`;
- `drafts`: synthetic drafts made from the decoder's own output.
"""
