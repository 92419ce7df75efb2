"""`funasr-nano serve` and 05_server.py: transcribe's model options, the server's address and limits.

The app is served by uvicorn; SIGINT/SIGTERM start a graceful shutdown: the listening socket
closes, requests still arriving on open connections get 503, requests in flight finish (up to
`--timeout`), then the models are freed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING

from funasr_nano.cli import (
    SetupError,
    check_folders,
    engine_config,
    log_to_stderr,
    open_engine,
    transcribe_options,
)
from funasr_nano.options import (
    DEFAULT_PRESET,
    EXIT_SETUP,
    OneLineParser,
    add_batch_size_option,
    add_deprecated_alias,
    add_model_options,
    add_preset_option,
    add_vad_option,
    examples,
    positive,
)
from funasr_nano.paths import CONSOLE_SCRIPT
from funasr_nano.presets import PRESETS

if TYPE_CHECKING:
    from funasr_nano.engine import Engine

log = logging.getLogger(__name__)
API_KEY_ENV = "FUNASR_API_KEY"
PROG = f"{CONSOLE_SCRIPT} serve"
# Largest WebSocket message: an input_audio_buffer.append of ~30 s of 24 kHz PCM16 in base64
WS_MAX_MESSAGE_BYTES = 2 * 2**20


def _origins(text: str) -> tuple[str, ...]:
    """--allowed-origins as the app compares them: lower case, no trailing slash."""
    return tuple(o.strip().rstrip("/").lower() for o in text.split(",") if o.strip())


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    run = f"python {prog}" if prog.endswith(".py") else prog
    batches = ", ".join(f"{name} {preset.server_batch}" for name, preset in PRESETS.items())
    p = OneLineParser(prog=prog,
                      description="OpenAI-compatible transcription server (POST /v1/audio/transcriptions): "
                                  "concurrent requests share one batched decoder.",
                      epilog=examples(
                          f"{run}                                  # http://127.0.0.1:8000/, cpu-int8",
                          f"{run} --preset gpu --host 0.0.0.0 --port 9000 --api-key SECRET",
                          f"{run} --model-dir ~/models/model-gguf --batch-size 4",
                          "curl -F file=@talk.mp3 http://127.0.0.1:8000/v1/audio/transcriptions",
                          notes="The page at / transcribes files and the microphone in a browser; /health, "
                                "/metrics answer without the API key; /v1/* and /openapi.json need it when one is set."))
    add_preset_option(p, DEFAULT_PRESET)
    add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    batch = add_batch_size_option(p, None, "segments decoded together in one llama.cpp context, across requests "
                                           f"(default: the preset's: {batches})")
    add_deprecated_alias(p, "--max-batch", batch)
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV}; none: open)")
    p.add_argument("--max-upload-mb", type=positive(float), default=25.0, help="largest upload in MB (default: 25)")
    p.add_argument("--max-audio-seconds", type=positive(float), default=1800.0,
                   help="longest audio accepted (default: 1800)")
    p.add_argument("--max-queue", type=positive(int), default=64,
                   help="requests accepted at once (decoding or waiting); more get 503 + Retry-After (default: 64)")
    p.add_argument("--timeout", type=positive(float), default=600.0,
                   help="seconds a request may take once uploaded (default: 600)")
    p.add_argument("--max-prompt-chars", type=positive(int), default=200,
                   help="longest prompt + hotwords of a request; sizes each sequence's KV cache (default: 200)")
    add_vad_option(p)
    p.add_argument("--max-streams", type=positive(int), default=8,
                   help="real-time WebSocket sessions at once on /v1/realtime (default: 8)")
    p.add_argument("--upload-timeout", type=positive(float), default=120.0,
                   help="seconds to receive one request's upload; slower ones get 408 (default: 120)")
    p.add_argument("--max-slow-uploads", type=positive(int), default=None,
                   help="requests still receiving their upload 2 s after it began, at once; more get 503 "
                        "(default: half of --max-queue)")
    p.add_argument("--header-timeout", type=positive(float), default=10.0,
                   help="seconds a connection may take to send a request's headers, then it is closed (default: 10)")
    p.add_argument("--max-connections", type=positive(int), default=1000,
                   help="open connections at once; more are closed at once (default: 1000)")
    p.add_argument("--allowed-origins", default="",
                   help="comma-separated origins of other web pages that may use the API and the WebSocket "
                        "(e.g. https://app.example.com; '*': any); a page served by this server and clients "
                        "that send no Origin (curl, SDKs) always may (default: none)")
    p.add_argument("--no-ui", action="store_true", help="do not serve the transcription page at /")
    p.add_argument("--model-name", default="fun-asr-nano", help="the id /v1/models lists (default: fun-asr-nano)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="the least severe log lines shown, the server's and uvicorn's (default: info)")
    return p


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    """Serve until SIGINT/SIGTERM: 0 after a graceful shutdown, 130 after Ctrl-C, 2 for a set-up problem."""
    args = build_parser(prog).parse_args(argv)
    log_to_stderr()
    logging.getLogger("funasr_nano").setLevel(args.log_level.upper())
    args.batch_size = args.batch_size or PRESETS[args.preset].server_batch
    try:
        check_folders(args)
        _check_port(args.host, args.port)
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_SETUP
    import uvicorn

    from funasr_nano.models.prompt import PromptOptions
    from funasr_nano.server.app import ServerConfig, create_app
    from funasr_nano.server.connections import protocol_class, quiet_accept_errors, raise_descriptor_limit

    # what every request and live session starts from (their choices: `dataclasses.replace` of these)
    defaults = transcribe_options(args, PromptOptions(), timestamps=False)
    config = ServerConfig(model_name=args.model_name, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                          max_upload_bytes=int(args.max_upload_mb * 2**20), max_audio_seconds=args.max_audio_seconds,
                          max_queue=args.max_queue, timeout=args.timeout, max_prompt_chars=args.max_prompt_chars,
                          max_streams=args.max_streams, upload_timeout=args.upload_timeout,
                          max_slow_uploads=args.max_slow_uploads, allowed_origins=_origins(args.allowed_origins),
                          ui=not args.no_ui, defaults=defaults)

    def load() -> Engine:  # on the app's loading thread: the server listens (and /health says so) meanwhile
        # the KV cache is sized for the longest prompt a request may send; one KV cache for all sequences: a new
        # request's prompt rows join the running decoding round (--batch-invariant keeps the split cache, where
        # each sequence's cells lie as when alone). A first use exports the model folder here.
        return open_engine(engine_config(args.preset, args, max_hotword_chars=args.max_prompt_chars,
                                         kv_unified=not args.batch_invariant))

    app = create_app(config, load)
    if not args.no_ui:
        log.info("transcription page: http://%s:%d/", args.host, args.port)
    max_connections = raise_descriptor_limit(args.max_connections)
    quiet_accept_errors()
    server = _Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                    timeout_graceful_shutdown=int(args.timeout) + 5,
                                    http=protocol_class(args.header_timeout, max_connections),
                                    ws_max_size=WS_MAX_MESSAGE_BYTES))
    try:
        server.run()
    except KeyboardInterrupt:
        # Ctrl-C: uvicorn has shut down gracefully, then re-raises the signal, which asyncio turns into
        # KeyboardInterrupt: exit quietly with the shell's code for an interrupt (128 + SIGINT), not 30 lines
        # of traceback
        return 130
    return 0


def _check_port(host: str, port: int) -> None:
    """SetupError when the address cannot be listened on (another server has it): before the models load
    and before the page's URL is printed, not uvicorn's error after a start-up that went nowhere."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise SetupError(f"--host {host}: {exc.strerror or exc}") from exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            probe.bind(address)
        except OSError as exc:
            raise SetupError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); is another server "
                             "running there? choose another --port") from exc


class _Server:
    """uvicorn's server, marking the app as draining as soon as a shutdown signal arrives."""

    def __new__(cls, config):  # noqa: ANN001 - uvicorn.Config
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame) -> None:  # noqa: ANN001
                self.config.app.state.server.admission.draining = True
                super().handle_exit(sig, frame)

        return Server(config)
