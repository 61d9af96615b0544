"""The bounded queue in front of the generator.

At most `concurrency` generations run at once, each on its own worker thread; at most `queue_depth` requests
wait for one, and the next is refused at once (`QueueFull`, a 503 with `Retry-After`) rather than left hanging.
Waiting plain requests with the same sampling settings are answered in one left-padded batch. A request holds its
slot until its generation has really ended - to the last token, or stopped because its client went away (a plain
request's answer stops at once, the rest of its batch goes on).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers import StoppingCriteria

from llava_lite.data.conversation import Conversation
from llava_lite.data.processor import EncodedConversation
from llava_lite.inference.generator import Completion, Generator, SamplingSettings

logger = logging.getLogger("llava_lite.serve")


class QueueFull(Exception):
    """No room: `retry_after` is the whole number of seconds a client had best wait before trying again."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(eq=False)  # a job is itself: two identical requests are still two jobs in the line
class _Job:
    conversation: Conversation | EncodedConversation
    images: list[Image.Image]
    settings: SamplingSettings
    stream: bool
    granted: asyncio.Future  # plain jobs: the Completion; streams: None once a slot is theirs
    gone: threading.Event = field(default_factory=threading.Event)  # set when a running plain job's client left


@dataclass
class Stats:
    running: int = 0
    waiting: int = 0
    counts: Counter = field(default_factory=Counter)  # served, failed, cancelled, rejected, batches


class Scheduler:
    def __init__(self, generator: Generator, concurrency: int, queue_depth: int, max_batch_size: int) -> None:
        self.generator = generator
        self.concurrency = concurrency
        self.queue_depth = queue_depth
        self.max_batch_size = max_batch_size
        self._waiting: deque[_Job] = deque()
        self._running = 0
        self._counts: Counter = Counter()
        self._slot_seconds = 1.0  # how long a slot was held lately (a moving average), for Retry-After
        # One thread per slot: the pool's size is the concurrency bound itself.
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="generate")
        self._tasks: set[asyncio.Task] = set()

    def stats(self) -> Stats:
        return Stats(self._running, len(self._waiting), Counter(self._counts))

    def check_room(self) -> None:
        """QueueFull unless a request arriving now would be taken (run, or put in line)."""
        if self._running >= self.concurrency and len(self._waiting) >= self.queue_depth:
            self._counts["rejected"] += 1
            raise QueueFull(
                f"the server is busy ({self._running} answering, {len(self._waiting)} waiting); try again shortly",
                self.retry_after(),
            )

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: about how long one was held lately, within 1 to 60 (the `openai`
        SDK waits what the header says up to 60 s, and backs off on its own beyond)."""
        return min(60, max(1, math.ceil(self._slot_seconds)))

    async def complete(
        self, conversation: Conversation | EncodedConversation, images: list[Image.Image], settings: SamplingSettings
    ) -> Completion:
        job = self._enqueue(conversation, images, settings, stream=False)
        try:
            return await job.granted
        except asyncio.CancelledError:
            # The client went away: still waiting - leave the line; already running - stop its answer.
            if not self._withdraw(job):
                job.gone.set()
            raise

    def stream(
        self, conversation: Conversation | EncodedConversation, images: list[Image.Image], settings: SamplingSettings
    ) -> StreamTicket:
        """A place in line for a streamed answer, taken now (or QueueFull now); iterate it for the pieces."""
        return StreamTicket(self, self._enqueue(conversation, images, settings, stream=True))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ----- the line -------------------------------------------------------------------------------------------
    def _enqueue(
        self,
        conversation: Conversation | EncodedConversation,
        images: list[Image.Image],
        settings: SamplingSettings,
        stream: bool,
    ) -> _Job:
        self.check_room()
        job = _Job(conversation, images, settings, stream, asyncio.get_running_loop().create_future())
        self._waiting.append(job)
        self._dispatch()
        return job

    def _withdraw(self, job: _Job) -> bool:
        """Take a job out of the line if it is still waiting there (its client left)."""
        if job not in self._waiting:
            return False
        self._waiting.remove(job)
        self._counts["cancelled"] += 1
        return True

    def _dispatch(self) -> None:
        while self._running < self.concurrency and self._waiting:
            job = self._waiting.popleft()
            self._running += 1
            if job.stream:
                job.granted.set_result(None)  # the ticket runs it, and releases the slot when it ends
            else:
                batch = [job, *self._take_compatible(job)]
                self._tasks.add(task := asyncio.get_running_loop().create_task(self._answer(batch)))
                task.add_done_callback(self._tasks.discard)  # held: the loop keeps only weak references to tasks

    def _take_compatible(self, first: _Job) -> list[_Job]:
        """Waiting plain jobs that can share `first`'s batch: the generator takes one settings per batch."""
        taken = []
        for job in list(self._waiting):
            if len(taken) + 1 >= self.max_batch_size:
                break
            if not job.stream and job.settings == first.settings:
                self._waiting.remove(job)
                taken.append(job)
        return taken

    def _release(self, held_since: float | None = None) -> None:
        self._running -= 1
        if held_since is not None:
            self._slot_seconds = 0.8 * self._slot_seconds + 0.2 * (time.monotonic() - held_since)
        self._dispatch()

    # ----- running ---------------------------------------------------------------------------------------
    async def _answer(self, batch: list[_Job]) -> None:
        self._counts["batches"] += 1
        started = time.monotonic()
        try:
            outcomes = await self._outcomes(batch)
        finally:
            self._release(started)
        for job, outcome in zip(batch, outcomes):
            if job.granted.done():
                self._counts["cancelled"] += 1  # its client gave up
                continue
            if isinstance(outcome, Exception):
                self._counts["failed"] += 1
                job.granted.set_exception(outcome)
            else:
                self._counts["served"] += 1
                job.granted.set_result(outcome)

    async def _outcomes(self, batch: list[_Job]) -> list[Completion | Exception]:
        """A completion or an error for each job. One bad request must not fail the others it was batched with:
        a batch that fails is answered again one job at a time."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, self._complete_batch, batch)
        except Exception as err:
            if len(batch) == 1:
                return [err]
            logger.warning("a batch of %d failed (%s: %s); answering one by one", len(batch), type(err).__name__, err)
        outcomes: list[Completion | Exception] = []
        for job in batch:
            outcomes += await self._outcomes([job])
        return outcomes

    def _complete_batch(self, batch: list[_Job]) -> list[Completion]:
        gone = _ClientsGone([job.gone for job in batch])
        completions = self.generator.complete(
            [job.conversation for job in batch], [job.images for job in batch], batch[0].settings, [gone]
        )
        for row, tokens in sorted(gone.stopped_after.items()):
            logger.info(
                "a client left: its answer stopped after %d of %d tokens (%d in its batch)",
                tokens,
                batch[row].settings.max_new_tokens,
                len(batch),
            )
        return completions


class _ClientsGone(StoppingCriteria):
    """Ends each answer of a batch whose client has gone - the batch ends once every answer has - and notes after
    how many tokens (the criteria are asked once per generated token)."""

    def __init__(self, gone: list[threading.Event]) -> None:
        self.gone = gone
        self.tokens = 0
        self.stopped_after: dict[int, int] = {}

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.tokens += 1
        flags = [event.is_set() for event in self.gone]
        for row in (row for row, flag in enumerate(flags) if flag):
            self.stopped_after.setdefault(row, self.tokens)
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)


_END = object()


class StreamTicket:
    """`async for piece in ticket` waits for a slot, then yields the answer's text as it is generated;
    `completion` holds the counts afterwards. `aclose` - which whoever took the ticket must call, however the
    stream ends - gives up the place in line or cancels the generation (noticed at its next piece of text)."""

    def __init__(self, scheduler: Scheduler, job: _Job) -> None:
        self._scheduler = scheduler
        self._job = job
        self._stop = threading.Event()
        self._pump: asyncio.Future | None = None
        self._closed = False
        self._started: float | None = None
        self.completion: Completion | None = None

    def __aiter__(self) -> AsyncIterator[str]:
        return self._pieces()

    async def aclose(self) -> None:
        self._close()

    def _close(self) -> None:
        self._stop.set()
        if self._closed or self._pump is not None:
            return  # a running generation gives its slot back itself, when its thread is done
        self._closed = True
        if not self._scheduler._withdraw(self._job):
            self._scheduler._release()  # granted a slot, never started: give it back now

    async def _pieces(self) -> AsyncIterator[str]:
        try:
            await self._job.granted
            if self._stop.is_set():
                return
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue = asyncio.Queue()
            self._started = time.monotonic()
            self._pump = loop.run_in_executor(self._scheduler._pool, self._run, loop, queue)
            self._pump.add_done_callback(self._ended)
            while (item := await queue.get()) is not _END:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            self._close()

    def _ended(self, pump: asyncio.Future) -> None:
        """On the event loop, once the generation thread is done: count how it ended, give the slot back."""
        outcome = "failed" if pump.cancelled() or pump.exception() else pump.result()
        self._scheduler._counts[outcome] += 1
        self._scheduler._release(self._started)

    def _run(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> str:
        """On a worker thread: run the generator's stream, hand pieces to the event loop, stop when told."""
        answer = None
        try:
            # Inside the try: a stream that fails to start (a bad prompt) must still reach the client as an error.
            answer = self._scheduler.generator.stream(self._job.conversation, self._job.images, self._job.settings)
            for piece in answer:
                if self._stop.is_set():
                    return "cancelled"
                _put(loop, queue, piece)
            self.completion = answer.completion
            return "served"
        except Exception as err:
            _put(loop, queue, err)
            return "failed"
        finally:
            if answer is not None:
                answer.close()  # stopped early: cancels the generation and waits for its thread
            _put(loop, queue, _END)


def _put(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, item: object) -> None:
    if not loop.is_closed():  # the server may be shutting down under a running generation
        loop.call_soon_threadsafe(queue.put_nowait, item)
