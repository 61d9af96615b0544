"""The bounded queue, against a stand-in generator whose timing the test controls: batching of compatible requests,
refusal when full (with a time to retry), one failing request not failing its batch, a slot given back when its
client leaves - a stream's, and a plain request's whose answer was still being generated."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from llava_lite.data.conversation import Conversation, Message
from llava_lite.inference.generator import Completion, SamplingSettings, StreamedAnswer
from llava_lite.serve.scheduler import QueueFull, Scheduler

DEADLINE = 30


class StandIn:
    """Answers each conversation with its own text; the first call waits until `gate` opens."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.batches: list[list[str]] = []
        self.stream_closed = threading.Event()
        self.answers: list[StreamedAnswer] = []

    def complete(self, conversations, images, settings, stopping_criteria=None) -> list[Completion]:
        self.gate.wait(DEADLINE)
        questions = [c.messages[-1].content for c in conversations]
        self.batches.append(questions)
        if "boom" in questions and len(questions) > 1:
            raise RuntimeError("a bad request in the batch")
        if questions == ["boom"]:
            raise RuntimeError("the bad request itself")
        return [Completion(f"answer to {q}", 3, 2, "length") for q in questions]

    def stream(self, conversation, images, settings) -> StreamedAnswer:
        def pieces() -> Iterator[str]:
            try:
                for number in range(10_000):
                    time.sleep(0.002)
                    yield f"piece {number} "
            finally:
                self.stream_closed.set()

        answer = StreamedAnswer(pieces(), lambda text: Completion(text, 3, 10_000, "length"))
        self.answers.append(answer)  # held, so that only closing it - not the garbage collector - ends its pieces
        return answer


def ask(text: str) -> Conversation:
    return Conversation([Message("user", text)])


async def _settled(condition) -> None:
    for _ in range(DEADLINE * 100):
        if condition():
            return
        await asyncio.sleep(0.01)
    pytest.fail("the scheduler did not settle")


def test_waiting_requests_with_the_same_settings_share_a_batch():
    generator = StandIn()
    greedy, sampled = SamplingSettings(max_new_tokens=4), SamplingSettings(max_new_tokens=4, temperature=0.7)

    async def run() -> list[Completion]:
        scheduler = Scheduler(generator, concurrency=1, queue_depth=10, max_batch_size=8)
        first = asyncio.ensure_future(scheduler.complete(ask("q0"), [], greedy))
        await asyncio.sleep(0)  # q0 is running (held at the gate); the rest wait in line
        rest = [scheduler.complete(ask(q), [], greedy) for q in ("q1", "q2", "q3")]
        odd = scheduler.complete(ask("q4"), [], sampled)
        waiting = [asyncio.ensure_future(c) for c in (*rest, odd)]
        await asyncio.sleep(0.05)
        generator.gate.set()
        return await asyncio.gather(first, *waiting)

    answers = asyncio.run(run())
    assert [a.text for a in answers] == [f"answer to q{n}" for n in range(5)]
    assert generator.batches == [["q0"], ["q1", "q2", "q3"], ["q4"]]


def test_a_full_line_is_refused_at_once():
    generator = StandIn()

    async def run() -> None:
        scheduler = Scheduler(generator, concurrency=1, queue_depth=1, max_batch_size=1)
        running = asyncio.ensure_future(scheduler.complete(ask("a"), [], SamplingSettings()))
        await asyncio.sleep(0)
        waiting = asyncio.ensure_future(scheduler.complete(ask("b"), [], SamplingSettings()))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await scheduler.complete(ask("c"), [], SamplingSettings())
        with pytest.raises(QueueFull):
            scheduler.stream(ask("d"), [], SamplingSettings())
        assert scheduler.stats().counts["rejected"] == 2
        generator.gate.set()
        await asyncio.gather(running, waiting)
        assert scheduler.stats().running == 0

    asyncio.run(run())


def test_one_failing_request_does_not_fail_its_batch():
    generator = StandIn()

    async def run() -> list:
        scheduler = Scheduler(generator, concurrency=1, queue_depth=10, max_batch_size=8)
        first = asyncio.ensure_future(scheduler.complete(ask("q0"), [], SamplingSettings()))
        await asyncio.sleep(0)
        batch = [
            asyncio.ensure_future(scheduler.complete(ask(q), [], SamplingSettings())) for q in ("q1", "boom", "q2")
        ]
        generator.gate.set()
        results = await asyncio.gather(first, *batch, return_exceptions=True)
        stats = scheduler.stats()
        assert (stats.counts["served"], stats.counts["failed"], stats.running) == (3, 1, 0)
        return results

    results = asyncio.run(run())
    assert [r.text for r in results if isinstance(r, Completion)] == ["answer to q0", "answer to q1", "answer to q2"]
    assert isinstance(results[2], RuntimeError)


def test_a_stream_left_early_stops_generating_and_gives_its_slot_back():
    generator = StandIn()

    async def run() -> None:
        scheduler = Scheduler(generator, concurrency=1, queue_depth=0, max_batch_size=1)
        ticket = scheduler.stream(ask("s"), [], SamplingSettings())
        pieces = ticket.__aiter__()
        assert [await pieces.__anext__() for _ in range(3)] == ["piece 0 ", "piece 1 ", "piece 2 "]
        with pytest.raises(QueueFull):  # the only slot is taken and no one may wait
            scheduler.stream(ask("t"), [], SamplingSettings())
        await pieces.aclose()
        await ticket.aclose()
        await _settled(lambda: scheduler.stats().running == 0)
        assert generator.stream_closed.is_set()
        assert scheduler.stats().counts["cancelled"] == 1 and ticket.completion is None
        generator.gate.set()
        assert (await scheduler.complete(ask("next"), [], SamplingSettings())).text == "answer to next"

    asyncio.run(run())


def test_a_stream_read_to_the_end_has_its_completion():
    class Short(StandIn):
        def stream(self, conversation, images, settings) -> StreamedAnswer:
            return StreamedAnswer((piece for piece in "ab"), lambda text: Completion(text, 3, 2, "stop"))

    async def run() -> None:
        scheduler = Scheduler(Short(), concurrency=1, queue_depth=0, max_batch_size=1)
        ticket = scheduler.stream(ask("s"), [], SamplingSettings())
        assert [piece async for piece in ticket] == ["a", "b"]
        await ticket.aclose()
        await _settled(lambda: scheduler.stats().running == 0)
        assert ticket.completion == Completion("ab", 3, 2, "stop")
        assert scheduler.stats().counts["served"] == 1

    asyncio.run(run())


def test_a_stream_that_fails_to_start_reaches_the_client_as_an_error():
    class Broken(StandIn):
        def stream(self, conversation, images, settings) -> StreamedAnswer:
            raise ValueError("the prompt cannot be encoded")

    async def run() -> None:
        scheduler = Scheduler(Broken(), concurrency=1, queue_depth=0, max_batch_size=1)
        ticket = scheduler.stream(ask("s"), [], SamplingSettings())
        with pytest.raises(ValueError, match="cannot be encoded"):
            await asyncio.wait_for(ticket.__aiter__().__anext__(), timeout=30)
        await ticket.aclose()
        await _settled(lambda: scheduler.stats().running == 0)
        assert scheduler.stats().counts["failed"] == 1

    asyncio.run(run())


class Stepping(StandIn):
    """Generates a batch token by token as transformers does, asking the stopping criteria after each token; a row
    they stop is done, and the batch ends when every row is (or at max_new_tokens). The first batch waits for
    `gate`. Records each batch's size and how many tokens it ran for."""

    def __init__(self) -> None:
        super().__init__()
        self.runs: list[tuple[int, int]] = []
        self.started = threading.Event()

    def complete(self, conversations, images, settings, stopping_criteria=None) -> list[Completion]:
        self.started.set()
        if not self.runs:
            self.gate.wait(DEADLINE)
        done = torch.zeros(len(conversations), dtype=torch.bool)
        tokens = 0
        while tokens < settings.max_new_tokens and not done.all():
            time.sleep(0.001)
            tokens += 1
            for criterion in stopping_criteria or ():
                done |= criterion(torch.zeros(len(conversations), tokens, dtype=torch.long), None)
        self.runs.append((len(conversations), tokens))
        return [Completion("x", 3, tokens, "length") for _ in conversations]


def test_a_plain_request_whose_client_leaves_stops_generating_and_frees_its_slot(caplog):
    generator = Stepping()
    generator.gate.set()

    async def run() -> None:
        scheduler = Scheduler(generator, concurrency=1, queue_depth=1, max_batch_size=1)
        request = asyncio.ensure_future(scheduler.complete(ask("long"), [], SamplingSettings(max_new_tokens=100_000)))
        await _settled(generator.started.is_set)
        request.cancel()  # what the server does when the client disconnects
        await _settled(lambda: scheduler.stats().running == 0)
        assert scheduler.stats().counts["cancelled"] == 1 and scheduler.stats().counts["served"] == 0
        answer = await scheduler.complete(ask("next"), [], SamplingSettings(max_new_tokens=5))
        assert answer.completion_tokens == 5

    with caplog.at_level(logging.INFO, logger="llava_lite.serve"):
        asyncio.run(run())
    (_, tokens), _ = generator.runs
    assert tokens < 100_000
    assert f"its answer stopped after {tokens} of 100000 tokens (1 in its batch)" in caplog.text


def test_a_client_leaving_a_shared_batch_stops_only_its_own_answer(caplog):
    generator = Stepping()
    settings = SamplingSettings(max_new_tokens=300)

    async def run() -> Completion:
        scheduler = Scheduler(generator, concurrency=1, queue_depth=2, max_batch_size=2)
        first = asyncio.ensure_future(scheduler.complete(ask("first"), [], SamplingSettings(max_new_tokens=1)))
        await _settled(generator.started.is_set)
        leaving = asyncio.ensure_future(scheduler.complete(ask("leaves"), [], settings))
        staying = asyncio.ensure_future(scheduler.complete(ask("stays"), [], settings))
        await asyncio.sleep(0)
        generator.gate.set()
        await first  # the two waiting requests now run as one batch
        await _settled(lambda: scheduler.stats().running == 1)
        leaving.cancel()
        return await staying

    with caplog.at_level(logging.INFO, logger="llava_lite.serve"):
        staying = asyncio.run(run())
    assert generator.runs[1] == (2, 300)  # the batch went on for the answer whose client stayed...
    assert staying.completion_tokens == 300
    assert "of 300 tokens (2 in its batch)" in caplog.text  # ...and stopped the one whose client left


def test_a_refusal_says_when_to_try_again():
    generator = StandIn()

    async def run() -> None:
        scheduler = Scheduler(generator, concurrency=1, queue_depth=0, max_batch_size=1)
        running = asyncio.ensure_future(scheduler.complete(ask("a"), [], SamplingSettings()))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull) as refused:
            await scheduler.complete(ask("b"), [], SamplingSettings())
        assert 1 <= refused.value.retry_after <= 60
        generator.gate.set()
        await running

    asyncio.run(run())
