"""The bounded queue, against a stand-in generator whose timing the test controls: batching of compatible requests,
refusal when full, one failing request not failing its batch, a stream's slot given back when its reader leaves."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

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

    def complete(self, conversations, images, settings) -> list[Completion]:
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
