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
from collections import deque
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
    """Prometheus metrics of one server process (a registry of its own, so servers and tests never share counters),
    each labelled with the model id it counts for; of(model) is one model's view."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        r = self.registry = CollectorRegistry()
        m = ["model"]
        self.running = Gauge("lmforge_requests_running", "Generations holding a slot of the engine", m, registry=r)
        self.waiting = Gauge("lmforge_requests_waiting", "Generations queued for a slot", m, registry=r)
        self.finished = Counter("lmforge_requests_finished", "Generations ended, by finish reason",
                                ["model", "finish_reason"], registry=r)
        self.rejected = Counter("lmforge_requests_rejected", "Requests refused because slots and queue were full",
                                m, registry=r)
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "Prompt tokens prefilled", m, registry=r)
        self.generation_tokens = Counter("lmforge_generation_tokens", "Tokens generated", m, registry=r)
        self.steps = Counter("lmforge_engine_steps", "Engine steps: each decodes one token for every running "
                             "generation (tokens / steps is the mean batch)", m, registry=r)
        self.time_to_first_token = Histogram(
            "lmforge_time_to_first_token_seconds", "From a request's arrival to its first generated token", m,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32), registry=r)
        self.time_per_token = Histogram(
            "lmforge_time_per_output_token_seconds", "Between two generated tokens of one generation", m,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=r)
        self.slots = Gauge("lmforge_slots", "Engine slots shared by every model served (generations decoding at "
                           "once)", registry=r)

    def of(self, model: str) -> "ModelMetrics":
        return ModelMetrics(self, model)

    def render(self) -> bytes:
        from prometheus_client import generate_latest
        return generate_latest(self.registry)


class ModelMetrics:
    """One model's series of a Metrics registry (what its engine's thread counts)."""

    def __init__(self, metrics: Metrics, model: str):
        self.model, self._finished = model, metrics.finished
        for name in ("running", "waiting", "rejected", "prompt_tokens", "generation_tokens", "steps",
                     "time_to_first_token", "time_per_token"):
            setattr(self, name, getattr(metrics, name).labels(model))

    def finished(self, reason: str):
        return self._finished.labels(self.model, reason)


class Slots:
    """The engine slots that every model of one server shares: `size` generations decode at once, whichever models
    they are for, and `capacity` (size plus the queue) bounds those decoding plus those waiting (Busy past it).
    Waiting generations get a slot in the order they arrived across models: a busy model cannot starve another.
    A granted slot reaches its model's engine thread as an ("admit", (job, choice)) message."""

    def __init__(self, size: int, queue: int):
        self.size, self.capacity = size, size + queue
        self.reserved = 0  # generations decoding or waiting
        self.granted = 0  # generations holding a slot
        self._waiting: deque = deque()  # (EngineLoop, Job, choice), oldest first
        self._lock = threading.Lock()

    def enter(self, loop: "EngineLoop", job: Job):
        """Queue a job's generations for slots as it arrives, or raise Busy when they do not fit."""
        with self._lock:
            if self.reserved + len(job.requests) > self.capacity:
                raise Busy(f"the server is at capacity ({self.capacity} generations running or queued)")
            self.reserved += len(job.requests)
            self._waiting.extend((loop, job, choice) for choice in range(len(job.requests)))
            self._grant()

    def take(self, which: Callable[["EngineLoop", Job], bool]) -> list[tuple[Job, int]]:
        """Remove the waiting generations for which which(loop, job) holds, giving back their reservations."""
        with self._lock:
            taken = [w for w in self._waiting if which(w[0], w[1])]
            if taken:
                self._waiting = deque(w for w in self._waiting if not which(w[0], w[1]))
                self.reserved -= len(taken)
            return [(job, choice) for _, job, choice in taken]

    def waiting(self, loop: "EngineLoop") -> int:
        with self._lock:
            return sum(w[0] is loop for w in self._waiting)

    def free(self, n: int = 1):
        """n generations holding slots ended: the slots go to the oldest waiting ones."""
        with self._lock:
            self.granted -= n
            self.reserved -= n
            self._grant()

    def _grant(self):
        while self.granted < self.size and self._waiting:
            loop, job, choice = self._waiting.popleft()
            self.granted += 1
            loop.inbox.put(("admit", (job, choice)))


class EngineLoop:
    """Owns one model's engine on its own thread. build() makes the engine there (loading and warming up can take a
    while: `ready` is set when it is done, `error` holds why it failed). Its generations take slots from `slots`,
    which may be shared with other models' loops; without one the loop has its own (capacity slots, no queue)."""

    def __init__(self, build: Callable[[], Engine], capacity: int, metrics: ModelMetrics,
                 on_failure: Callable[[BaseException], None] = lambda e: None, slots: Slots | None = None):
        self.build, self.metrics, self.on_failure = build, metrics, on_failure
        self.slots = slots or Slots(capacity, 0)
        self.engine: Engine | None = None
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.in_flight = 0  # this model's generations submitted and not yet ended (guarded by _lock)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"lmforge-engine-{metrics.model}",
                                        daemon=True)

    @property
    def capacity(self) -> int:
        return self.slots.capacity

    def start(self):
        self._thread.start()

    def stop(self, timeout: float = 10.0):
        self.inbox.put(("stop", None))
        self._thread.join(timeout)

    def submit(self, job: Job):
        """Queue a job's generations for slots (the engine's thread hears of each as it is granted), or raise Busy
        when they do not fit."""
        with self._lock:
            self.in_flight += len(job.requests)
        try:
            self.slots.enter(self, job)
        except Busy:
            with self._lock:
                self.in_flight -= len(job.requests)
            self.metrics.rejected.inc()
            raise

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
        aborting: str | None = None
        while True:
            messages = []
            if not engine.has_work():  # idle: wait for a message, waking to time out what waits in the queue
                try:
                    messages.append(self.inbox.get(timeout=0.1))
                except queue.Empty:
                    pass
            while True:
                try:
                    messages.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            for kind, item in messages:
                if kind == "stop":
                    return
                if kind == "admit":
                    job, choice = item
                    if job.cancelled or aborting:
                        self._free(1)
                        if not job.cancelled:
                            self._tell_end(job, choice, -1, aborting)
                    else:
                        self._admit(job, choice, owners)
                elif kind == "abort":
                    aborting = item
                    self._leave_queue(self.slots.take(lambda loop, job: loop is self), item)
                    self._end(dict(owners), owners, last_token, item)
                elif kind == "cancel":
                    item.cancelled = True
                    self._leave_queue(self.slots.take(lambda loop, job: job is item), None)
                    for rid in item.ids:
                        if engine.cancel(rid):
                            owners.pop(rid, None)
                            last_token.pop(rid, None)
                            self._free(1)
            now = time.monotonic()  # the queue's late ones first: a slot freed below goes to one still in time
            self._leave_queue(self.slots.take(lambda loop, job: loop is self and job.deadline is not None
                                            and now > job.deadline), "timeout")
            late = {rid: o for rid, o in owners.items() if o[0].deadline is not None and now > o[0].deadline}
            if late:
                self._end(late, owners, last_token, "timeout")
            self._gauges()
            if not engine.has_work():
                continue
            try:
                events = engine.step()
                self.metrics.steps.inc()
                self._account(events, owners, last_token)
                self._gauges()
            except Exception as e:  # a bug: fail the requests in flight (their slots freed), keep serving the next
                log.exception("%s: engine step failed", self.metrics.model)
                failed = list(owners.items())
                for rid, _ in failed:
                    engine.cancel(rid)
                self._free(len(failed))  # before the jobs hear of it: their slots are free when they answer
                owners.clear()
                last_token.clear()
                for _, (job, _) in failed:
                    self._deliver(job, None, e)

    def _tell_end(self, job: Job, choice: int, rid: int, reason: str):
        self.metrics.finished(reason).inc()
        job.finish_reasons.append(reason)
        self._deliver(job, choice, Event(rid, None, finished=True, finish_reason=reason))

    def _end(self, ending: dict, owners: dict, last_token: dict, reason: str):
        """End these running generations now: each leaves the engine and its job gets a last event with this
        reason."""
        for rid, (job, choice) in ending.items():
            self.engine.cancel(rid)
            owners.pop(rid, None)
            last_token.pop(rid, None)
            self._free(1)
            self._tell_end(job, choice, rid, reason)

    def _leave_queue(self, taken: list[tuple[Job, int]], reason: str | None):
        """Generations that never got a slot leave (taken from the queue, their reservation given back); with a
        reason, each job hears that it ended."""
        with self._lock:
            self.in_flight -= len(taken)
        for job, choice in taken:
            if reason is not None:
                self._tell_end(job, choice, -1, reason)

    def _gauges(self):
        self.metrics.running.set(self.engine.num_running)
        self.metrics.waiting.set(self.engine.num_waiting + self.slots.waiting(self))

    def _admit(self, job: Job, choice: int, owners: dict):
        request = job.requests[choice]
        try:
            rid = self.engine.add(request)
        except Exception as e:  # the handler checked it already; this is a bug, but it stays this job's
            log.exception("%s: engine.add failed", self.metrics.model)
            self._free(1)
            self.cancel(job)
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
                self.metrics.finished(event.finish_reason).inc()
                job.finish_reasons.append(event.finish_reason)
                self._free(1)
            self._deliver(job, choice, event)

    def _free(self, n: int):
        """n of this model's generations holding slots ended."""
        if n:
            with self._lock:
                self.in_flight -= n
            self.slots.free(n)

    @staticmethod
    def _deliver(job: Job, choice: int | None, item):
        try:
            job.loop.call_soon_threadsafe(job.events.put_nowait, (choice, item))
        except RuntimeError:  # the handler's event loop is closed: the server is shutting down
            pass
