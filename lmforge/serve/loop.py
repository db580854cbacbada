"""The engine's thread: the one place that touches the Engine while the server runs.

HTTP handlers run on uvicorn's asyncio loop; decoding runs here, on a thread of its own, so a step never blocks the
loop that reads and writes sockets. Handlers talk to this thread through an inbox (submit a job, cancel a job); the
thread takes everything in the inbox between two engine steps, so requests join and leave the running batch between
steps, and it hands each event back to the handler's asyncio queue. Nothing here knows HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ..engine import Engine, Event, Request

log = logging.getLogger("lmforge.serve")


class Busy(Exception):
    """The engine's slots and queue are full: the client should retry later (HTTP 429)."""


@dataclass(eq=False)
class Job:
    """One HTTP request's generations (its prompts x n choices), and where their events go: (choice, Event) pairs,
    or (None, exception) if the engine failed."""
    requests: list[Request]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    submitted: float = field(default_factory=time.monotonic)
    ids: list[int] = field(default_factory=list)  # engine request ids, set by the engine thread
    cancelled: bool = False
    deadline: float | None = None  # monotonic time past which its generations end with finish_reason "timeout"
    first_token: float | None = None  # when its first token came (set by the engine thread)
    tokens_out: int = 0  # tokens generated for it so far
    finish_reasons: list = field(default_factory=list)  # each generation's, as they end


class Metrics:
    """Prometheus metrics of one server (a registry of its own, so servers and tests never share counters)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        r = self.registry = CollectorRegistry()
        self.running = Gauge("lmforge_requests_running", "Generations holding a slot of the engine", registry=r)
        self.waiting = Gauge("lmforge_requests_waiting", "Generations queued for a slot", registry=r)
        self.finished = Counter("lmforge_requests_finished", "Generations ended, by finish reason",
                                ["finish_reason"], registry=r)
        self.rejected = Counter("lmforge_requests_rejected", "Requests refused because slots and queue were full",
                                registry=r)
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("lmforge_generation_tokens", "Tokens generated", registry=r)
        self.steps = Counter("lmforge_engine_steps", "Engine steps: each decodes one token for every running "
                             "generation (tokens / steps is the mean batch)", registry=r)
        self.time_to_first_token = Histogram(
            "lmforge_time_to_first_token_seconds", "From a request's arrival to its first generated token",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32), registry=r)
        self.time_per_token = Histogram(
            "lmforge_time_per_output_token_seconds", "Between two generated tokens of one generation",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=r)

    def render(self) -> bytes:
        from prometheus_client import generate_latest
        return generate_latest(self.registry)


class EngineLoop:
    """Owns the engine on its own thread. build() makes the engine there (loading and warming up can take a while:
    `ready` is set when it is done, `error` holds why it failed); capacity bounds the generations running plus
    waiting, so a flood of requests gets Busy instead of an unbounded queue."""

    def __init__(self, build: Callable[[], Engine], capacity: int, metrics: Metrics,
                 on_failure: Callable[[BaseException], None] = lambda e: None):
        self.build, self.capacity, self.metrics, self.on_failure = build, capacity, metrics, on_failure
        self.engine: Engine | None = None
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.in_flight = 0  # generations submitted and not yet ended (guarded by _lock)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)

    def start(self):
        self._thread.start()

    def stop(self, timeout: float = 10.0):
        self.inbox.put(("stop", None))
        self._thread.join(timeout)

    def submit(self, job: Job):
        """Queue a job's generations, or raise Busy when they do not fit."""
        with self._lock:
            if self.in_flight + len(job.requests) > self.capacity:
                self.metrics.rejected.inc()
                raise Busy(f"the server is at capacity ({self.capacity} generations running or queued)")
            self.in_flight += len(job.requests)
        self.inbox.put(("add", job))

    def cancel(self, job: Job):
        """Drop whatever of the job is still running or queued (the client went away)."""
        self.inbox.put(("cancel", job))

    def abort_all(self, reason: str = "shutdown"):
        """End every generation running or queued, now and from now on, each with this finish_reason: what a
        shutdown does to the generations its drain did not see finish."""
        self.inbox.put(("abort", reason))

    # --- the thread
    def _run(self):
        try:
            self.engine = self.build()
        except BaseException as e:  # reported by /health and the server's log; the server then shuts down
            self.error = e
            self.ready.set()
            self.on_failure(e)
            return
        self.ready.set()
        owners: dict[int, tuple[Job, int]] = {}  # engine id -> (job, choice)
        last_token: dict[int, float] = {}  # engine id -> when its last token came
        engine = self.engine
        self._aborting: str | None = None
        while True:
            messages = [self.inbox.get()] if not engine.has_work() else []
            while True:
                try:
                    messages.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            for kind, job in messages:
                if kind == "stop":
                    return
                if kind == "add":
                    self._add(job, owners)
                    if self._aborting:
                        self._end({rid: owners[rid] for rid in job.ids if rid in owners}, owners, last_token,
                                  self._aborting)
                elif kind == "abort":
                    self._aborting = job
                    self._end(dict(owners), owners, last_token, job)
                elif kind == "cancel":
                    job.cancelled = True
                    for rid in job.ids:
                        if engine.cancel(rid):
                            owners.pop(rid, None)
                            last_token.pop(rid, None)
                            self._release(1)
            now = time.monotonic()
            late = {rid: o for rid, o in owners.items() if o[0].deadline is not None and now > o[0].deadline}
            if late:
                self._end(late, owners, last_token, "timeout")
            self._gauges()
            if not engine.has_work():
                continue
            try:
                events = engine.step()
            except Exception as e:  # a bug: fail the requests in flight, keep serving the next ones
                log.exception("engine step failed")
                for rid, (job, _) in list(owners.items()):
                    engine.cancel(rid)
                    self._deliver(job, None, e)
                self._release(len(owners))
                owners.clear()
                last_token.clear()
                continue
            self.metrics.steps.inc()
            self._account(events, owners, last_token)
            self._gauges()

    def _end(self, ending: dict, owners: dict, last_token: dict, reason: str):
        """End these generations now: each leaves the engine and its job gets a last event with this reason."""
        for rid, (job, choice) in ending.items():
            self.engine.cancel(rid)
            owners.pop(rid, None)
            last_token.pop(rid, None)
            self.metrics.finished.labels(reason).inc()
            self._release(1)
            job.finish_reasons.append(reason)
            self._deliver(job, choice, Event(rid, None, finished=True, finish_reason=reason))

    def _gauges(self):
        self.metrics.running.set(self.engine.num_running)
        self.metrics.waiting.set(self.engine.num_waiting)

    def _add(self, job: Job, owners: dict):
        if job.cancelled:  # cancelled before it reached the engine
            self._release(len(job.requests))
            return
        for choice, request in enumerate(job.requests):
            try:
                rid = self.engine.add(request)
            except Exception as e:  # the handler checked it already; this is a bug, but it stays this job's
                log.exception("engine.add failed")
                self._release(len(job.requests) - choice)
                for rid in job.ids:
                    if self.engine.cancel(rid):
                        owners.pop(rid, None)
                        self._release(1)
                self._deliver(job, None, e)
                return
            job.ids.append(rid)
            owners[rid] = (job, choice)
            self.metrics.prompt_tokens.inc(len(request.prompt))

    def _account(self, events: list[Event], owners: dict, last_token: dict):
        now = time.monotonic()
        for event in events:
            job, choice = owners[event.request_id]
            if event.token is not None:
                self.metrics.generation_tokens.inc()
                previous = last_token.get(event.request_id)
                job.tokens_out += 1
                if job.first_token is None:
                    job.first_token = now
                if previous is None:
                    self.metrics.time_to_first_token.observe(now - job.submitted)
                else:
                    self.metrics.time_per_token.observe(now - previous)
                last_token[event.request_id] = now
            if event.finished:
                owners.pop(event.request_id)
                last_token.pop(event.request_id, None)
                self.metrics.finished.labels(event.finish_reason).inc()
                job.finish_reasons.append(event.finish_reason)
                self._release(1)
            self._deliver(job, choice, event)

    def _release(self, n: int):
        with self._lock:
            self.in_flight -= n

    @staticmethod
    def _deliver(job: Job, choice: int | None, item):
        try:
            job.loop.call_soon_threadsafe(job.events.put_nowait, (choice, item))
        except RuntimeError:  # the handler's event loop is closed: the server is shutting down
            pass
