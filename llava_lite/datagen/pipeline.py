"""The datagen run: one task per image and kind, through the backend with bounded concurrency, into the journal.

Workers (as many as the backend's `concurrency`) ask the backend and judge the replies; only the main thread
writes the journal, one batch at a time, so its lines never interleave. `finish` then drops duplicates in the
tasks' fixed order and writes the final output and rejects atomically.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from llava_lite.data.annotations import ImageAnnotations, build_context
from llava_lite.data.conversation import IMAGE_PLACEHOLDER
from llava_lite.data.writing import write_records
from llava_lite.datagen.filters import DEFAULT_BOUNDS, Bounds, DuplicateFilter, check_reply, check_turns, parse_score
from llava_lite.datagen.parse import Rejection, Turn, parse_description, parse_turns
from llava_lite.datagen.prompts import PromptSet
from llava_lite.llm.chat import Backend, ChatReply, ChatRequest
from llava_lite.llm.journal import Journal

OK, REJECTED, FAILED = "ok", "rejected", "failed"


@dataclass
class Task:
    key: str  # "IMAGE_ID-KIND": the record's id, and the journal's key
    kind: str
    image: ImageAnnotations
    context: str
    question: str | None = None  # detail: the instruction the description answers


@dataclass
class Judge:
    backend: Backend
    prompt: PromptSet
    threshold: float


@dataclass
class Settings:
    bounds: dict[str, Bounds] = field(default_factory=lambda: dict(DEFAULT_BOUNDS))
    max_consecutive_failures: int = 20


def build_tasks(
    images: list[ImageAnnotations], kinds: list[str], prompts: dict[str, PromptSet], seed: int
) -> list[Task]:
    tasks = []
    for image in images:
        context = build_context(image)
        for kind in kinds:
            key = f"{image.id}-{kind}"
            question = random.Random(f"{seed}:{key}").choice(prompts[kind].questions) if kind == "detail" else None
            tasks.append(Task(key, kind, image, context, question))
    return tasks


def pending_tasks(tasks: list[Task], journal: Journal) -> list[Task]:
    """The tasks a run still has to do: those the journal lacks, or has as failed (at the backend, or malformed)."""
    return [task for task in tasks if journal.entries.get(task.key, {}).get("status") not in (OK, REJECTED)]


class TaskRunner:
    """Runs tasks through the backend (and the judge, if any) into the journal, as many batches at once as the
    backend's concurrency."""

    def __init__(
        self,
        backend: Backend,
        prompts: dict[str, PromptSet],
        journal: Journal,
        settings: Settings | None = None,
        judge: Judge | None = None,
    ) -> None:
        self.backend = backend
        self.prompts = prompts
        self.journal = journal
        self.settings = settings or Settings()
        self.judge = judge

    # ----- the run ----------------------------------------------------------------------------------------------
    def run(self, tasks: list[Task], progress: bool = True) -> None:
        """Do every task the journal lacks (or has as failed)."""
        pending = pending_tasks(tasks, self.journal)
        batches = iter(_chunks(pending, self.backend.batch_size))
        failures_in_a_row = 0
        window = 2 * self.backend.concurrency  # enough queued work to keep every worker busy, no more
        bar = tqdm(
            total=len(tasks), initial=len(tasks) - len(pending), desc="datagen", unit="task", disable=not progress
        )
        pool = ThreadPoolExecutor(max_workers=self.backend.concurrency, thread_name_prefix="datagen")
        in_flight: set[Future] = set()
        try:
            self._submit(pool, batches, in_flight, window)
            while in_flight:
                finished, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in finished:
                    entries = future.result()
                    self.journal.append(entries)
                    bar.update(len(entries))
                    for entry in entries:
                        failures_in_a_row = failures_in_a_row + 1 if entry["status"] == FAILED else 0
                        if failures_in_a_row >= self.settings.max_consecutive_failures:
                            raise ValueError(
                                f"the backend failed {failures_in_a_row} tasks in a row (last: {entry['detail']}); "
                                "stopping - what was done is kept, rerun the same command to resume"
                            )
                self._submit(pool, batches, in_flight, window)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            bar.close()

    def _submit(self, pool: ThreadPoolExecutor, batches: Iterator, in_flight: set, window: int) -> None:
        while len(in_flight) < window:
            batch = next(batches, None)
            if batch is None:
                return
            in_flight.add(pool.submit(self.process, batch))

    def process(self, batch: list[Task]) -> list[dict]:
        """One batch of tasks to journal entries (runs in a worker thread)."""
        requests = [ChatRequest(t.key, t.kind, self.prompts[t.kind].messages(t.context), t.image) for t in batch]
        replies = self.backend.complete(requests)
        entries = [self._entry(task, reply) for task, reply in zip(batch, replies)]
        if self.judge is not None:
            self._judge(batch, entries)
        return entries

    # ----- one reply to one entry -------------------------------------------------------------------------------
    def _entry(self, task: Task, reply: ChatReply) -> dict:
        entry = {"key": task.key, "usage": _usage(reply), "retries": dict(reply.retries)}
        if reply.failed:  # journaled as failed: the next run asks again
            return {**entry, "status": FAILED, "reason": reply.error, "detail": reply.detail}
        try:
            if reply.error:
                raise Rejection(reply.error, reply.detail)
            turns = self._turns(task, check_reply(reply.text))
            check_turns(turns, self.settings.bounds[task.kind])
        except Rejection as rejection:
            return {
                **entry,
                "status": REJECTED,
                "reason": rejection.reason,
                "detail": rejection.detail,
                "reply": reply.text,
            }
        return {**entry, "status": OK, "record": self._record(task, turns)}

    def _turns(self, task: Task, text: str) -> list[Turn]:
        if task.kind == "detail":
            return [Turn(task.question, parse_description(text))]
        return parse_turns(text)

    def _record(self, task: Task, turns: list[Turn]) -> dict:
        conversations = []
        for number, turn in enumerate(turns):
            question = f"{IMAGE_PLACEHOLDER}\n{turn.question}" if number == 0 else turn.question
            conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": turn.answer}]
        metadata = {
            "kind": task.kind,
            "backend": self.backend.name,
            "model": self.backend.model,
            "image_id": task.image.id,
        }
        return {"id": task.key, "image": task.image.image, "conversations": conversations, "metadata": metadata}

    def _judge(self, batch: list[Task], entries: list[dict]) -> None:
        judged = [(task, entry) for task, entry in zip(batch, entries) if entry["status"] == OK]
        requests = [self._judge_request(task, entry["record"]) for task, entry in judged]
        replies = []
        for start in range(0, len(requests), self.judge.backend.batch_size):
            replies += self.judge.backend.complete(requests[start : start + self.judge.backend.batch_size])
        for (_, entry), reply in zip(judged, replies):
            for name, count in _usage(reply).items():
                entry["usage"][name] += count
            for cause, count in reply.retries.items():
                entry["retries"][cause] = entry["retries"].get(cause, 0) + count
            score = parse_score(reply.text)
            if reply.failed:
                entry.update(status=FAILED, reason=reply.error, detail=f"judge: {reply.detail}")
            elif score is None:
                entry.update(
                    status=REJECTED, reason="judge_no_score", detail="the judge gave no `Score: N`", reply=reply.text
                )
            elif score < self.judge.threshold:
                entry.update(
                    status=REJECTED, reason="low_judge_score", detail=f"score {score:g} < {self.judge.threshold:g}"
                )
            else:
                entry["record"]["metadata"]["judge_score"] = score
                continue
            entry.pop("record")

    def _judge_request(self, task: Task, record: dict) -> ChatRequest:
        turns = record["conversations"]
        labels = {"human": "Question", "gpt": "Answer"}
        dialogue = "\n".join(
            f"{labels[turn['from']]}: {turn['value'].replace(IMAGE_PLACEHOLDER, '').strip()}" for turn in turns
        )
        text = self.judge.prompt.request.replace("{context}", task.context).replace("{dialogue}", dialogue)
        messages = [{"role": "system", "content": self.judge.prompt.system}, {"role": "user", "content": text}]
        return ChatRequest(f"{task.key}-judge", "judge", messages, task.image)


# ----- the final files --------------------------------------------------------------------------------------------


@dataclass
class Summary:
    generated: Counter = field(default_factory=Counter)  # by kind
    rejected: Counter = field(default_factory=Counter)  # by reason
    failed: int = 0
    retries: Counter = field(default_factory=Counter)  # by cause
    tokens: Counter = field(default_factory=Counter)

    def lines(self) -> list[str]:
        kinds = ", ".join(f"{kind} {n}" for kind, n in self.generated.items()) or "none"
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(self.rejected.items())) or "none"
        causes = ", ".join(f"{cause} {n}" for cause, n in sorted(self.retries.items()))
        return [
            f"generated: {sum(self.generated.values())} ({kinds})",
            f"rejected: {sum(self.rejected.values())} ({reasons})",
            f"retries: {sum(self.retries.values())}" + (f" ({causes})" if causes else ""),
            f"tokens: {self.tokens['prompt_tokens']} prompt, {self.tokens['completion_tokens']} completion",
        ]


def finish(tasks: list[Task], journal: Journal, out: str | Path, rejects: str | Path, near_duplicate: float) -> Summary:
    """Write the output and rejects from the journal, duplicates dropped in task order; remove the journal when done."""
    summary = Summary()
    dedup = DuplicateFilter(near_duplicate)
    records, rejected = [], []
    for task in tasks:
        entry = journal.entries[task.key]
        summary.retries.update(entry.get("retries", {}))
        summary.tokens.update(entry.get("usage", {}))
        if entry["status"] == OK:
            try:
                dedup.check(task.image.id, _record_text(entry["record"]))
                records.append(entry["record"])
                summary.generated[task.kind] += 1
                continue
            except Rejection as rejection:
                entry = {**entry, "reason": rejection.reason, "detail": rejection.detail}
                entry["reply"] = _record_text(entry["record"])
        summary.failed += entry["status"] == FAILED
        summary.rejected[entry["reason"]] += 1
        rejected.append(
            {
                "id": task.key,
                "image": task.image.image,
                "kind": task.kind,
                "reason": entry["reason"],
                "detail": entry["detail"],
                "reply": entry.get("reply"),
            }
        )
    write_records(out, records)
    write_records(rejects, rejected)
    if summary.failed:
        journal.close()  # kept: the next run tries the failed tasks again
    else:
        journal.remove()
    return summary


def _record_text(record: dict) -> str:
    return "\n".join(turn["value"].replace(IMAGE_PLACEHOLDER, "") for turn in record["conversations"])


def _usage(reply: ChatReply) -> dict[str, int]:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens}


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
