"""Real-time transcription benchmark: latency of one stream, and how many streams keep up.

    python benchmarks/realtime.py                      # full shapes (built once into ~/.cache), cpu-int8
    python benchmarks/realtime.py --size tiny --seconds 12 --streams 1,2   # a quick check of the script

Each stream plays the clip (with 1.5 s pauses, repeated to --seconds) into a `RealtimeSession` at
real-time pace, 0.1 s per append, all sessions on one engine. Random weights never stop, so every
final is forced to 4.5 tokens per second of its audio (the clip's own rate), as the long-audio
benchmark does. Reported for one stream:
- *final delay*: from the moment a segment's last (padded) audio was appended to its completed
  event, p50/p95; it includes the VAD's wait for the pause (0.3 s of silence, less the 0.1 s pad);
- *first partial*: from the append of a segment's first speech to its first delta;
- *extra over offline*: the final's time after the segment closed (committed -> completed) less
  `Engine.transcribe` of the same slice alone (median over the segments);
then, for each count in --streams, whether that many streams are sustained without falling behind
(no audio dropped, no `falling_behind`, and final delay p95 within the session's own lag limit,
`RealtimeConfig.max_lag_seconds`, 5 s), and whether it also stays within --max-final-delay (2 s). By default every stream plays the same audio in lockstep, so all their segments
end at the same moment (the worst case); `--stagger S` spreads the streams' starts over S seconds. `--encoder-cost` also times
features + encoder + CTC head per window length (the partials' cost model).

Each count also says where the time went, in seconds per second of the run: the partials' features +
encoder + CTC head, the finals' features + encoder (+ CTC draft), prompts placed, decode rounds, and the
decoder thread's idle share (1 - prompts - rounds). `--configs` lists the set-ups to run, each count
through each in turn, so before and after come from one run: `<kv>:<budget>`, kv `unified` (as
`05_server.py` opens it: prompts folded into the running round) or `split` (as `06_microphone.py`
alone), budget `on` (`funasr_nano.realtime.partials.PartialBudget`) or `off` (partials whenever their
own stream has no final outstanding). `--compare` is `split:off,unified:off,unified:on`.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.runner import DEFAULT_AUDIO, DEFAULT_CACHE, ensure_models  # noqa: E402
from funasr_nano.audio.load import load_audio  # noqa: E402
from funasr_nano.engine import Engine, TranscribeOptions  # noqa: E402
from funasr_nano.realtime import RealtimeConfig, RealtimeSession, SessionSettings  # noqa: E402
from funasr_nano.realtime.events import Committed, Error, TranscriptionCompleted, TranscriptionDelta  # noqa: E402
from funasr_nano.realtime.events import SpeechStarted as Started  # noqa: E402
from testing.bench_engine import BenchmarkEngine  # noqa: E402

SR = 16000
CHUNK = 1600  # 0.1 s
TOKENS_PER_SECOND = 4.5


def build_audio(clip: np.ndarray, seconds: float) -> np.ndarray:
    pause = np.zeros(int(1.5 * SR), np.float32)
    parts: list[np.ndarray] = [pause]
    while sum(len(p) for p in parts) < seconds * SR:
        parts += [clip, pause]
    return np.concatenate(parts)


class Timeline:
    """When each event arrived and when each chunk of audio was appended."""

    def __init__(self) -> None:
        self.events: list[tuple[float, object]] = []
        self.sent: list[tuple[int, float]] = []  # (samples appended so far, time)

    def __call__(self, event) -> None:
        self.events.append((time.monotonic(), event))

    def sent_at(self, ms: int) -> float:
        sample = ms * SR // 1000
        return next(t for n, t in self.sent if n >= sample)


def play(session: RealtimeSession, audio: np.ndarray, timeline: Timeline) -> None:
    t0 = time.monotonic()
    for start in range(0, len(audio), CHUNK):
        session.append(audio[start: start + CHUNK])
        timeline.sent.append((min(len(audio), start + CHUNK), time.monotonic()))
        time.sleep(max(0.0, t0 + (start + CHUNK) / SR - time.monotonic()))
    session.finish(timeout=600)


class Breakdown:
    """Seconds of each kind of work during one run (`start` .. `stop`), from the engine's counters and two timers."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.budget = engine, engine.partial_budget
        self.finals_encoder = 0.0
        prepare = engine.prepare

        def timed_prepare(*args, **kwargs):  # the finals' features + encoder (+ CTC draft), on the sessions' threads
            t0 = time.perf_counter()
            try:
                return prepare(*args, **kwargs)
            finally:
                self.finals_encoder += time.perf_counter() - t0

        engine.prepare = timed_prepare  # an instance attribute: submit_segment's self.prepare finds it

    def start(self) -> None:
        stats = self.engine.scheduler.stats
        self._t0 = time.perf_counter()
        self._base = (self.budget.stats.seconds, self.finals_encoder, stats.prefill_seconds, stats.round_seconds,
                      self.budget.stats.runs, self.budget.stats.busy + self.budget.stats.late)

    def stop(self) -> dict[str, float]:
        stats = self.engine.scheduler.stats
        wall = time.perf_counter() - self._t0
        now = (self.budget.stats.seconds, self.finals_encoder, stats.prefill_seconds, stats.round_seconds,
               self.budget.stats.runs, self.budget.stats.busy + self.budget.stats.late)
        partial, finals, prefill, rounds, runs, held = (b - a for a, b in zip(self._base, now))
        return {"wall": wall, "partials_encoder": partial / wall, "finals_encoder": finals / wall,
                "prefill": prefill / wall, "rounds": rounds / wall, "idle": max(0.0, 1 - (prefill + rounds) / wall),
                "partials_run": runs, "partials_held": held}


def run_streams(engine: Engine, audio: np.ndarray, n: int, config: RealtimeConfig,
                stagger: float = 0.0) -> list[Timeline]:
    """`n` sessions playing `audio` at once; stream i starts with i * stagger / n seconds of silence."""
    timelines = [Timeline() for _ in range(n)]
    sessions = [RealtimeSession(engine, SessionSettings(), config, t) for t in timelines]
    plays = [np.concatenate([np.zeros(int(i * stagger / n * SR), np.float32), audio]) for i in range(n)]
    threads = [threading.Thread(target=play, args=(s, a, t)) for s, a, t in zip(sessions, plays, timelines)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in sessions:
        s.close()
    return timelines


def measures(timeline: Timeline) -> dict:
    final, first_partial, after_commit, spans = [], [], [], []
    started: dict[str, int] = {}
    committed: dict[str, float] = {}
    seen_partial: set[str] = set()
    for t, e in timeline.events:
        if isinstance(e, Started):
            started[e.item_id] = e.audio_start_ms
        elif isinstance(e, TranscriptionDelta) and e.item_id not in seen_partial and e.item_id in started:
            seen_partial.add(e.item_id)
            first_partial.append(t - timeline.sent_at(started[e.item_id] + 100))  # speech onset: after the pad
        elif isinstance(e, Committed):
            committed[e.item_id] = t
        elif isinstance(e, TranscriptionCompleted):
            final.append(t - timeline.sent_at(e.audio_end_ms))
            after_commit.append(t - committed[e.item_id])
            spans.append((e.audio_start_ms, e.audio_end_ms))
    errors = [e.code for _, e in timeline.events if isinstance(e, Error)]
    return {"final": final, "first_partial": first_partial, "after_commit": after_commit, "spans": spans,
            "errors": errors}


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _setups(text: str) -> list[tuple[str, bool]]:
    """`unified:on,split:off` -> [("unified", True), ("split", False)]."""
    out = []
    for item in text.split(","):
        kv, _, budget = item.strip().partition(":")
        if kv not in ("unified", "split") or budget not in ("on", "off"):
            raise SystemExit(f"--configs: {item!r} is not <unified|split>:<on|off>")
        out.append((kv, budget == "on"))
    return out


def encoder_cost(engine: Engine, audio: np.ndarray) -> list[tuple[float, float]]:
    from funasr_nano.realtime.partials import PartialTranscriber

    partials = PartialTranscriber(engine, window_seconds=60.0)
    out = []
    for seconds in (0.5, 1, 2, 4, 8, 15, 30):
        piece = np.resize(audio, int(seconds * SR))
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            partials._ctc_text(piece)
            runs.append(time.perf_counter() - t0)
        out.append((seconds, min(runs)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--audio", type=Path, default=DEFAULT_AUDIO)
    p.add_argument("--seconds", type=float, default=40.0, help="audio per stream (default 40)")
    p.add_argument("--streams", default="1,2,4,6,8", help="stream counts to try (default 1,2,4,6,8)")
    p.add_argument("--preset", default="cpu-int8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-final-delay", type=float, default=2.0, help="p95 final delay a sustained count keeps (s)")
    p.add_argument("--stagger", type=float, default=0.0,
                   help="spread the streams' starts over this many seconds (default 0: all speak in lockstep, "
                        "every segment ending at once; the clip's period, 11.5, spreads them evenly)")
    p.add_argument("--encoder-cost", action="store_true", help="also time the partials' encoder + CTC per length")
    p.add_argument("--configs", default="unified:on", help="set-ups <kv>:<budget>, comma-separated: kv unified "
                   "(as 05_server.py) or split (as 06), partial budget on or off (default unified:on)")
    p.add_argument("--compare", action="store_true", help="--configs split:off,unified:off,unified:on")
    p.add_argument("--size", default="full")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--models", type=Path, default=None, help="use these exports instead of building")
    args = p.parse_args(argv)
    counts = [int(c) for c in args.streams.split(",")]
    build = SimpleNamespace(size=args.size, seed=args.seed, cache=args.cache, checkpoint=None, models=args.models,
                            threads=args.threads, child_timeout=3600.0, quiet=True)
    _, models, _ = ensure_models(build, lambda m: print(m, file=sys.stderr))
    clip = load_audio(args.audio, SR)
    audio = build_audio(clip, args.seconds)
    config = RealtimeConfig()
    print(f"# Real-time transcription ({args.size} shapes, {args.preset}, {args.threads} threads)\n")
    print(f"- audio per stream: {len(audio) / SR:.1f} s ({args.audio.name} with 1.5 s pauses); finals forced to "
          f"{TOKENS_PER_SECOND} tokens per second of audio; partial every {config.partial_interval_seconds} s, "
          f"window {config.partial_window_seconds} s\n")
    setups = _setups("split:off,unified:off,unified:on" if args.compare else args.configs)
    engines: dict[str, Engine] = {}
    for kv in dict.fromkeys(kv for kv, _ in setups):  # one engine per KV layout, all open for the whole run
        engines[kv] = BenchmarkEngine.from_preset(args.preset, models, threads=args.threads,
                                                  batch_size=max(4, max(counts)), kv_unified=kv == "unified",
                                                  tokens_per_second=TOKENS_PER_SECOND)
    breakdowns = {kv: Breakdown(e) for kv, e in engines.items()}
    engine = engines[setups[-1][0]]  # the one-stream section: the last set-up's
    try:
        if args.encoder_cost:
            print("| audio s | features + encoder + CTC, ms |\n|---|---|")
            for seconds, cost in encoder_cost(engine, clip):
                print(f"| {seconds:g} | {cost * 1000:.0f} |")
            print()
        one = measures(run_streams(engine, audio, 1, config)[0])
        offline = []
        for start_ms, end_ms in one["spans"]:
            t0 = time.perf_counter()
            engine.transcribe(audio[start_ms * 16: end_ms * 16], TranscribeOptions(vad="none"))
            offline.append(time.perf_counter() - t0)
        extra = [a - o for a, o in zip(one["after_commit"], offline)]
        print(f"## One stream ({setups[-1][0]} KV cache, partial budget {'on' if setups[-1][1] else 'off'})\n\n"
              "| measure | p50 s | p95 s |\n|---|---|---|")
        print(f"| final delay (end of segment audio -> completed) | {pct(one['final'], 50):.3f} | "
              f"{pct(one['final'], 95):.3f} |")
        print(f"| speech -> first partial | {pct(one['first_partial'], 50):.3f} | {pct(one['first_partial'], 95):.3f} |")
        print(f"| final after commit | {pct(one['after_commit'], 50):.3f} | {pct(one['after_commit'], 95):.3f} |")
        print(f"| offline transcription of the same segment | {pct(offline, 50):.3f} | {pct(offline, 95):.3f} |")
        print(f"| extra over offline (target <= 0.3) | {statistics.median(extra) if extra else float('nan'):.3f} | "
              f"{pct(extra, 95):.3f} |")
        print(f"\n{len(one['spans'])} segments; errors: {one['errors'] or 'none'}\n")
        print(f"## Simultaneous streams (starts spread over {args.stagger:g} s)\n\n| streams | KV cache | partial budget "
              f"| final delay p50 s | p95 s | first partial p50 s | partials run / held | audio dropped | "
              f"final p95 <= {args.max_final_delay:g} s | partials enc | finals enc | prompts | rounds | decoder idle |"
              "\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        kept_up: dict[tuple[str, bool], int] = {}
        prompt: dict[tuple[str, bool], int] = {}
        for n in counts:
            for kv, budget in setups:
                run_config = dataclasses.replace(config, partial_budget=budget)
                breakdowns[kv].start()
                runs = [measures(t) for t in run_streams(engines[kv], audio, n, run_config, args.stagger)]
                ts = breakdowns[kv].stop()
                final = [x for r in runs for x in r["final"]]
                partial = [x for r in runs for x in r["first_partial"]]
                dropped = sum(r["errors"].count("falling_behind") for r in runs)
                fast = dropped == 0 and pct(final, 95) <= args.max_final_delay
                # behind: audio dropped, or finals later than the lag a session allows itself (max_lag_seconds)
                if dropped == 0 and pct(final, 95) <= config.max_lag_seconds:
                    kept_up[kv, budget] = max(kept_up.get((kv, budget), 0), n)
                if fast:
                    prompt[kv, budget] = max(prompt.get((kv, budget), 0), n)
                print(f"| {n} | {kv} | {'on' if budget else 'off'} | {pct(final, 50):.3f} | {pct(final, 95):.3f} | "
                      f"{pct(partial, 50):.3f} | {ts['partials_run']} / {ts['partials_held']} | {dropped} | "
                      f"{'yes' if fast else 'no'} | {ts['partials_encoder']:.2f} | {ts['finals_encoder']:.2f} | "
                      f"{ts['prefill']:.2f} | {ts['rounds']:.2f} | {ts['idle']:.2f} |", flush=True)
        print()
        for kv, budget in setups:
            print(f"- {kv} KV cache, partial budget {'on' if budget else 'off'}: streams sustained without falling "
                  f"behind: {kept_up.get((kv, budget), 0)}; of those with final delay p95 <= "
                  f"{args.max_final_delay:g} s: {prompt.get((kv, budget), 0)}")
    finally:
        for e in engines.values():
            e.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
