"""Dynamic batching: requests that arrive within a short window are decoded together, in one batch, on one
worker thread that owns the decoder.

The asyncio side only queues jobs and streams what the worker sends back. Rows of a batch are independent (left
padding and attention masks), so greedy decoding gives each request the answer it gets alone; padding only changes
the shapes of the matrix products, and the tests and benchmarks/serve_load.py check that this leaves answers
unchanged.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace

from cepe_rag.readers import GenerationConfig, Reader
from cepe_rag.serving.schemas import ApiError
from cepe_rag.types import CepeRagError, Passage

log = logging.getLogger("cepe_rag.serving")


class QueueFull(Exception):
    """More requests are waiting than the server accepts: the client should retry later (HTTP 429)."""


@dataclass(eq=False)  # compared by identity: the waiting queue removes exactly this job
class Job:
    """One chat request on its way through the batcher. The worker thread reports back through `events`:
    ("start", passages read, prompt tokens), then ("delta", text)..., then ("end", finish reason, completion
    tokens); or ("error", ApiError) at any point."""

    reader: str
    question: str
    passages: list[Passage]
    generation: GenerationConfig
    history: list[dict] = field(default_factory=list)  # earlier turns, rendered by the chat template
    system_prompt: str | None = None
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
    """Collects waiting jobs into batches (same key, at most `max_batch`, the window counted from the oldest
    job's arrival) and decodes each batch with the reader's batched decoding loop.

    At most `max_waiting` jobs wait; `submit` raises QueueFull beyond that, so memory stays bounded. A cancelled
    job (its client went away) leaves the waiting queue at once; in a running batch its row is no longer
    streamed, and the batch stops as soon as no row is left to stream."""

    def __init__(self, readers: dict[str, Reader], *, max_batch: int = 16, max_waiting: int = 64,
                 window_s: float = 0.005, reserved_answer_tokens: int = 512):
        self.readers = readers
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.window_s = window_s
        # Prompts are budgeted for the longest answer a request may ask for, so a request's passages do not
        # depend on its max_tokens.
        self.reserved_answer_tokens = reserved_answer_tokens
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

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while True:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return None
                # Wait out the window, counted from the oldest job: after a long batch, jobs that queued
                # during it go at once.
                key = self._waiting[0].key
                deadline = self._waiting[0].submitted + self.window_s
                while (not self._stopping and self._waiting and time.monotonic() < deadline
                       and sum(j.key == key for j in self._waiting) < self.max_batch):
                    self._cond.wait(deadline - time.monotonic())
                batch = [j for j in self._waiting if j.key == key][: self.max_batch]
                if batch:  # else the jobs of that key were all cancelled meanwhile: start over
                    for job in batch:
                        self._waiting.remove(job)
                    self._running = batch
                    return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                self._decode(batch)
            except Exception:  # a bug or out of memory: fail this batch, keep serving
                log.exception("decoding a batch of %d failed", len(batch))
                for job in batch:
                    if not job.finished:
                        job.finished = True
                        job.send("error", ApiError(500, "the model failed on this request", type="server_error"))
            finally:
                with self._cond:
                    self._running = []

    def _decode(self, batch: list[Job]) -> None:
        reader = self.readers[batch[0].reader]
        rows, prepared = [], []
        for job in batch:
            if job.cancelled.is_set():
                continue
            # A shallow copy shares the model, tokenizer and caches; only this request's turns and system
            # prompt differ (the reader renders them through the chat template).
            view = copy.copy(reader)
            view.history = job.history
            view.system_prompt = job.system_prompt or reader.system_prompt
            view.generation = replace(job.generation, max_new_tokens=self.reserved_answer_tokens)
            try:
                prepared.append(view.prepare(job.question, job.passages))
            except CepeRagError as error:  # too long for the decoder's window
                job.finished = True
                job.send("error", ApiError(400, str(error), param="messages", code="context_length_exceeded"))
                continue
            rows.append(job)
        if not rows:
            return
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(rows))
        for job, prompt in zip(rows, prepared):
            job.send("start", list(prompt.passages), len(prompt.ids))
        # Every row decodes up to the longest max_tokens of the batch and is cut at its own.
        config = replace(rows[0].generation, max_new_tokens=max(j.generation.max_new_tokens for j in rows))
        stream = reader.stream_prepared(prepared, config)  # prompts prepared above, each with its own turns
        try:
            for step, deltas in enumerate(stream, start=1):
                ended = getattr(deltas, "done", None) or [False] * len(rows)
                for job, delta, row_ended in zip(rows, deltas, ended):
                    if job.finished or job.cancelled.is_set():
                        continue
                    if delta:
                        job.text += delta
                        job.send("delta", delta)
                    if row_ended:
                        job.finish("stop", self._count_tokens(reader, job.text))  # ended: answer now, not at batch end
                    elif step == job.generation.max_new_tokens:
                        # A row still producing text at its last step ran out of tokens; an empty delta means
                        # it had ended (end of sequence or a stop string).
                        job.finish("length" if delta else "stop", self._count_tokens(reader, job.text))
                if all(job.finished or job.cancelled.is_set() for job in rows):
                    break  # nobody left to stream to: free the model for the next batch
        finally:
            stream.close()
        # Readers whose stream does not say which rows ended: their rows are closed when the whole batch has ended.
        for job in rows:
            if not (job.finished or job.cancelled.is_set()):
                job.finish("stop", self._count_tokens(reader, job.text))

    @staticmethod
    def _count_tokens(reader: Reader, text: str) -> int:
        return len(reader.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0
