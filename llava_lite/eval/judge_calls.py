"""The judge's requests of the judged evaluations (MT-Bench scores, pairwise verdicts), through the llm backends:
in flight `concurrency` at a time, retried by the backend, journaled, with tokens and retries counted.

Every request is one journal entry keyed by the task (`QUESTION#TURN`, `PROMPT#ours_first`) with a fingerprint of
what decides the verdict: the judge model, its sampling settings and the messages it is shown. A rerun asks again
only for what has no entry with that fingerprint and a usable verdict: a request the backend gave up on, a reply
without a verdict (counted as `unparsable`, never read as a score), a reply cut short or refused, a task whose
answer or prompt changed. The journal stays beside the results: it is the record of what the judge said.
"""

from __future__ import annotations

import base64
import hashlib
import json
import mimetypes
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from llava_lite.llm.backends import BackendSettings, build_backend
from llava_lite.llm.chat import Backend, ChatRequest
from llava_lite.llm.journal import Journal

OK = "ok"
UNPARSABLE = "unparsable"


@dataclass
class JudgeSettings:
    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 4
    temperature: float = 0.0
    max_tokens: int = 1024  # the judge explains before its verdict; room for both
    images: bool = False  # send a visual question's images to the judge (a vision judge) as data URIs

    def __post_init__(self) -> None:
        if not (self.base_url and self.model):
            raise ValueError(
                "a judged evaluation needs --judge-base-url and --judge-model: the judge server and its model name"
            )
        if self.concurrency < 1:
            raise ValueError(f"--judge-concurrency must be at least 1, got {self.concurrency}")


@dataclass
class JudgeTask:
    key: str
    messages: list[dict]


@dataclass
class JudgeReport:
    asked_now: int = 0  # requests this run sent
    reused: int = 0  # verdicts found in the journal
    statuses: Counter = field(default_factory=Counter)  # of every task's latest entry: ok, unparsable, backend_error..
    tokens: Counter = field(default_factory=Counter)  # prompt, completion tokens of each task's latest entry (any run)
    retries: Counter = field(default_factory=Counter)  # by cause

    def as_dict(self) -> dict:
        return {
            "asked_now": self.asked_now,
            "reused": self.reused,
            "statuses": dict(sorted(self.statuses.items())),
            "prompt_tokens": self.tokens["prompt_tokens"],
            "completion_tokens": self.tokens["completion_tokens"],
            "retries": dict(sorted(self.retries.items())),
        }


def ask_judge(
    tasks: list[JudgeTask],
    settings: JudgeSettings,
    journal: Journal,
    parse: Callable[[str], Any],
    progress: bool = True,
) -> tuple[dict[str, dict], JudgeReport]:
    """Each task's journal entry (`status`, `verdict`: what `parse` read from the reply, or None when it read
    nothing; `reply`, `usage`), asking the judge only for the tasks the journal has no usable verdict for."""
    report = JudgeReport()
    fingerprints = {task.key: fingerprint(settings, task.messages) for task in tasks}
    todo = []
    for task in tasks:
        entry = journal.entries.get(task.key)
        if entry is not None and entry.get("fingerprint") == fingerprints[task.key] and entry["status"] == OK:
            report.reused += 1
        else:
            todo.append(task)
    if todo:
        backend = judge_backend(settings)
        size = max(1, backend.batch_size)
        chunks = [todo[start : start + size] for start in range(0, len(todo), size)]

        def complete(chunk: list[JudgeTask]) -> list:
            return backend.complete([ChatRequest(task.key, "judge", task.messages) for task in chunk])

        try:
            with ThreadPoolExecutor(max_workers=settings.concurrency, thread_name_prefix="judge") as pool:
                bar = tqdm(total=len(todo), desc="judge", unit="request", disable=not progress)
                for chunk, replies in zip(chunks, pool.map(complete, chunks)):
                    journal.append(
                        _entry(task, fingerprints[task.key], reply, parse) for task, reply in zip(chunk, replies)
                    )
                    report.asked_now += len(chunk)
                    bar.update(len(chunk))
                bar.close()
        finally:
            backend.close()
    entries = {task.key: journal.entries[task.key] for task in tasks}
    for entry in entries.values():
        report.statuses[entry["status"]] += 1
        report.tokens.update(entry.get("usage", {}))
        report.retries.update(entry.get("retries", {}))
    return entries, report


def judge_backend(settings: JudgeSettings) -> Backend:
    return build_backend(
        BackendSettings(
            "openai",
            settings.model,
            settings.base_url,
            api_key_env=settings.api_key_env,
            concurrency=settings.concurrency,
            temperature=settings.temperature,
            max_tokens=settings.max_tokens,
        )
    )


def fingerprint(settings: JudgeSettings, messages: list[dict]) -> str:
    decided_by = [settings.model, settings.temperature, settings.max_tokens, messages]
    return hashlib.sha256(json.dumps(decided_by, ensure_ascii=False).encode("utf-8")).hexdigest()[:32]


def user_message(text: str, images: list[str], send_images: bool) -> dict:
    """The judge's user message: the text alone, or (`send_images`) the images as data-URI parts before it."""
    if not (send_images and images):
        return {"role": "user", "content": text}
    parts: list[dict] = [{"type": "image_url", "image_url": {"url": _data_uri(Path(path))}} for path in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def _entry(task: JudgeTask, task_fingerprint: str, reply, parse: Callable[[str], Any]) -> dict:
    entry = {
        "key": task.key,
        "fingerprint": task_fingerprint,
        "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens},
        "retries": dict(reply.retries),
        "reply": reply.text,
    }
    verdict = parse(reply.text) if reply.text else None
    if verdict is not None:  # a reply cut at max_tokens still counts when its verdict made it in
        return {**entry, "status": OK, "verdict": verdict}
    if reply.error is not None:
        return {**entry, "status": reply.error, "verdict": None, "detail": reply.detail}
    return {**entry, "status": UNPARSABLE, "verdict": None, "detail": "no verdict in the reply"}


def _data_uri(path: Path) -> str:
    kind = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def judged_files(results_path: str | Path, evaluation: str) -> dict[str, Path]:
    """Where a judged evaluation (`mt_bench`, `versus`) keeps its journals and writes its answers and judgements,
    beside the results file."""
    stem = Path(results_path).with_suffix("")
    return {
        key: stem.with_name(f"{stem.name}.{evaluation}.{name}")
        for key, name in (
            ("answers_journal", "answers.journal"),
            ("judgements_journal", "judgements.journal"),
            ("answers", "answers.jsonl"),
            ("judgements", "judgements.jsonl"),
        )
    }
