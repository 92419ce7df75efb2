"""Audio on its way in: decoding files (`load`), fbank + LFR features, Silero VAD, cutting at quiet points.

`load_audio` and `iter_audio_blocks` are re-exported here, the package's most used entry points.
"""

from funasr_nano.audio.load import AudioError, iter_audio_blocks, load_audio

__all__ = ["AudioError", "iter_audio_blocks", "load_audio"]
