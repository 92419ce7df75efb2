"""The HTTP server (05_server.py): OpenAI's `POST /v1/audio/transcriptions` on one shared Engine.

- `app`: the FastAPI app factory (routes, background model loading, streaming, shutdown);
- `requests`: the multipart fields checked and turned into engine options;
- `responses`: json / text / srt / vtt / verbose_json bodies and the SSE events;
- `service`: a request's transcription on a worker thread, feeding the shared scheduler;
- `limits`: upload cap, bounded queue, API key;
- `metrics`: Prometheus metrics;
- `errors`: OpenAI-style error bodies;
- `cli`: the command line.
"""
