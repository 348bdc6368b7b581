"""Continuous batching on one worker thread that owns the decoder: requests that arrive within a short window start
together; between decoding steps, rows that ended leave the batch and waiting requests join it.

The asyncio side only queues jobs and streams what the worker sends back. Rows of a batch are independent (left
padding and attention masks), so greedy decoding gives each request the answer it gets alone; padding only changes
the shapes of the matrix products, and the tests and benchmarks/serve_load.py check that this leaves answers
unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace

from cepe_rag.readers import GenerationConfig, Reader
from cepe_rag.serving.schemas import ApiError
from cepe_rag.types import CepeRagError, Conversation, Passage

log = logging.getLogger("cepe_rag.serving")


class QueueFull(Exception):
    """More requests are waiting than the server accepts: the client should retry later (HTTP 429)."""


@dataclass(eq=False)  # compared by identity: the waiting queue removes exactly this job
class Job:
    """One chat request on its way through the batcher. The worker thread reports back through `events`:
    ("start", passages read, prompt tokens, which were read and why), then ("delta", text)..., then ("end", finish
    reason, completion tokens); or ("error", ApiError) at any point."""

    reader: str
    question: str
    passages: list[Passage]
    generation: GenerationConfig
    conversation: Conversation = field(default_factory=Conversation)  # system prompt, earlier turns
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)
    text: str = ""
    finished: bool = False
    abstained: str | None = None  # why it is answered NOT_IN_DOCUMENTS without the model (no relevant passage)

    @property
    def key(self) -> tuple:
        """Jobs batch together only when one decoding config serves them all (max_new_tokens aside: each row
        stops at its own). Seeded sampling runs alone, so that the seed alone decides its answer."""
        g = self.generation
        solo = id(self) if g.temperature > 0 and g.seed is not None else None
        return self.reader, g.temperature, g.top_p, g.stop_strings, g.seed, solo

    def send(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass

    def finish(self, reason: str, completion_tokens: int) -> None:
        self.finished = True
        self.send("end", reason, completion_tokens)


class Batcher:
    """Runs waiting jobs in one decoding batch per key (at most `max_batch` rows), admitting new jobs between
    steps (`DecodeBatch.join`) and dropping rows that ended (`DecodeBatch.keep`).

    At most `max_waiting` jobs wait; `submit` raises QueueFull beyond that, so memory stays bounded. A cancelled
    job (its client went away) leaves the waiting queue at once, or the running batch at the next step."""

    def __init__(self, readers: dict[str, Reader], *, max_batch: int = 16, max_waiting: int = 64,
                 window_s: float = 0.005):
        self.readers = readers
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.window_s = window_s
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="cepe-rag-decoder", daemon=True)
        self.batches = 0
        self.largest_batch = 0

    # --- the asyncio side ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            for job in list(self._waiting) + self._running:
                job.cancelled.set()
            self._waiting.clear()
            self._cond.notify_all()
        self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting; retry in a moment")
            self._waiting.append(job)
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """The client went away: free its place in the queue, or stop streaming its row."""
        job.cancelled.set()
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def counts(self) -> dict[str, int]:
        with self._cond:
            return {"waiting": len(self._waiting),
                    "decoding": sum(not (j.finished or j.cancelled.is_set()) for j in self._running)}

    # --- the worker thread ----------------------------------------------------------------------------

    def _next_jobs(self, running_key: tuple | None, room: int) -> list[Job] | None:
        """The jobs to start now (None: the server is stopping). With nothing running: wait for a job, then out
        the window (counted from the oldest job's arrival) for more of its key. While a batch runs: the jobs of its
        key already waiting, no window; none if an older job of another key waits, so that the running batch drains
        and that job is not starved."""
        with self._cond:
            while running_key is None and not self._waiting and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            if not self._waiting or room <= 0 or running_key not in (None, self._waiting[0].key):
                return []
            key = self._waiting[0].key
            if running_key is None:
                deadline = self._waiting[0].submitted + self.window_s
                while (not self._stopping and self._waiting and time.monotonic() < deadline
                       and sum(j.key == key for j in self._waiting) < room):
                    self._cond.wait(deadline - time.monotonic())
            jobs = [j for j in self._waiting if j.key == key][:room]
            for job in jobs:
                self._waiting.remove(job)
            self._running = self._running + jobs
            return jobs

    def _run(self) -> None:
        """Continuous batching: between two decoding steps, finished rows leave the batch and waiting requests join
        it (after their own prefill), so nobody waits for the longest answer of a batch."""
        batch, rows = None, []
        while (jobs := self._next_jobs(rows[0].key if rows else None, self.max_batch - len(rows))) is not None:
            if jobs and (started := self._start(jobs)) is not None:
                if batch is None:
                    batch, rows = started
                else:
                    batch.join(started[0])
                    rows = rows + started[1]
            if batch is not None and rows:
                try:
                    self._deliver(rows, batch, batch.step())
                except Exception:  # a bug or out of memory: fail these rows, keep serving
                    self._fail(rows, "decoding a batch of %d failed")
                    batch, rows = None, []
            batch, rows = self._prune(batch, rows)

    def _start(self, jobs: list[Job]):
        """Prepare and prefill newly admitted jobs as one batch; returns it (past its first step) with its jobs."""
        reader = self.readers[jobs[0].reader]
        rows, prepared = [], []
        for job in jobs:
            if job.cancelled.is_set():
                continue
            # Prompts are budgeted for the reader's own answer length (the server's --max-tokens), not the
            # request's, so a request's passages do not depend on its max_tokens.
            try:
                prepared.append(reader.prepare_request(job.question, job.passages, job.conversation))
            except CepeRagError as error:  # too long for the decoder's window
                job.finished = True
                job.send("error", ApiError(400, str(error), param="messages", code="context_length_exceeded"))
                continue
            rows.append(job)
        if not rows:
            return None
        self.batches += 1
        for job, prompt in zip(rows, prepared):
            job.send("start", list(prompt.passages), len(prompt.ids), prompt.read_rule)
        limits = [job.generation.max_new_tokens for job in rows]
        try:
            batch = reader.start(prepared, replace(rows[0].generation, max_new_tokens=max(limits)), limits=limits)
            self._deliver(rows, batch, batch.step())
        except Exception:
            self._fail(rows, "starting a batch of %d failed")
            return None
        return batch, rows

    def _deliver(self, rows: list[Job], batch, deltas) -> None:
        reader = self.readers[rows[0].reader]
        for index, (job, delta) in enumerate(zip(rows, deltas)):
            if job.finished or job.cancelled.is_set():
                continue
            if delta:
                job.text += delta
                job.send("delta", delta)
            if batch.done[index]:  # ended: answered now, not when the batch ends
                reason = "length" if batch.out_of_tokens[index] else "stop"
                job.finish(reason, self._count_tokens(reader, job.text))

    def _prune(self, batch, rows: list[Job]):
        """Rows that ended or whose client went away leave the batch: the next steps compute only the others."""
        keep = [i for i, job in enumerate(rows) if not (job.finished or job.cancelled.is_set())]
        if len(keep) < len(rows):
            rows = [rows[i] for i in keep]
            if rows:
                batch.keep(keep)
            else:
                batch = None
        with self._cond:
            self._running = list(rows)
        self.largest_batch = max(self.largest_batch, len(rows))
        return batch, rows

    def _fail(self, rows: list[Job], message: str) -> None:
        log.exception(message, len(rows))
        for job in rows:
            if not job.finished:
                job.finished = True
                job.send("error", ApiError(500, "the model failed on this request", type="server_error"))

    @staticmethod
    def _count_tokens(reader: Reader, text: str) -> int:
        return len(reader.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0
