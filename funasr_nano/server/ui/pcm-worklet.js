// Runs on the audio thread: the microphone's samples as 16-bit PCM chunks of about 100 ms, with their level.
class PcmChunker extends AudioWorkletProcessor {
  constructor() {
    super();
    this.size = Math.round(sampleRate / 10);
    this.chunk = new Int16Array(this.size);
    this.filled = 0;
    this.sumSquares = 0;
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (!channel) return true;
    for (let i = 0; i < channel.length; i++) {
      const x = Math.max(-1, Math.min(1, channel[i]));
      this.sumSquares += x * x;
      this.chunk[this.filled++] = x < 0 ? Math.round(x * 32768) : Math.round(x * 32767);
      if (this.filled === this.size) {
        const rms = Math.sqrt(this.sumSquares / this.filled);
        this.port.postMessage({ pcm: this.chunk.buffer, rms }, [this.chunk.buffer]);
        this.chunk = new Int16Array(this.size); // the old one's buffer went with the message
        this.filled = 0;
        this.sumSquares = 0;
      }
    }
    return true;
  }
}

registerProcessor("pcm-chunker", PcmChunker);
