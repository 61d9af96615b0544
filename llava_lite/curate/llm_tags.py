"""The LLM tagger: each distinct instruction sent once, through the package's LLM client (`llava_lite.llm`), to be
given open tags for the intentions it holds, as InsTag asks ChatGPT; the replies journaled.

A reply must hold a JSON list of tags (strings, or objects with a `tag`); anything else is `no_tags`, and a request
that failed (`backend_error`, `malformed_reply`) or was refused keeps its reason. Every one of these is journaled
(`OUT.journal`, `llava_lite.llm.journal`) and asked again when the same command is run again; the journal is keyed
by the instruction's text, so an instruction is never asked twice once tagged, and it is removed when every
instruction has its tags. A kill loses at most the requests in flight.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from llava_lite.curate.tags import Tagger, TagReport, tag_records
from llava_lite.llm.backends import BackendSettings, build_backend
from llava_lite.llm.chat import REFUSAL, Backend, ChatReply, ChatRequest
from llava_lite.llm.journal import Journal

OK, NO_TAGS = "ok", "no_tags"
SYSTEM = "You annotate instructions given to an AI assistant with tags for what they ask it to do."
PROMPT = (
    "Give tags for the intentions in the user query below: short open labels, one to three words each, naming the "
    'tasks, skills and topics it asks for (for example "image description", "object counting", "spatial '
    'reasoning", "color recognition"). Give as many tags as the query needs and no more. Reply with a JSON list '
    "of strings and nothing else.\n\nUser query:\n{instruction}"
)
MAX_TAG_WORDS = 6  # longer than this is a sentence, not a tag
JSON_LIST = re.compile(r"\[.*\]", re.DOTALL)


def instruction_key(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def tag_request(text: str) -> ChatRequest:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT.format(instruction=text)}]
    return ChatRequest(instruction_key(text), "tag", messages)


def parse_tags(text: str | None) -> list[str] | None:
    """The tags of a reply: its JSON list (the first `[` to the last `]`, code fences or words around it allowed) of
    strings or `{"tag": ...}` objects; None when there is no such list, or no usable tag in it."""
    match = JSON_LIST.search(text or "")
    if match is None:
        return None
    try:
        items = json.loads(match.group(0))
    except json.JSONDecodeError:
        return None
    tags = []
    for item in items if isinstance(items, list) else []:
        tag = item.get("tag") if isinstance(item, dict) else item
        if isinstance(tag, str) and tag.strip() and len(tag.split()) <= MAX_TAG_WORDS:
            tags.append(tag.strip())
    return tags or None


def journal_entry(request: ChatRequest, reply: ChatReply) -> dict:
    entry = {
        "key": request.key,
        "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens},
        "retries": dict(reply.retries),
    }
    if reply.failed or reply.error == REFUSAL:
        return {**entry, "status": reply.error, "detail": reply.detail}
    tags = parse_tags(reply.text)  # a reply cut at max_tokens may still hold its list
    if tags is None:
        return {**entry, "status": NO_TAGS, "reply": reply.text, "detail": reply.error or "no JSON list of tags"}
    return {**entry, "status": OK, "tags": tags}


def llm_tagger(backend: Backend, journal: Journal, report: TagReport, progress: bool = True) -> Tagger:
    """A tagger that asks `backend` for what `journal` lacks or has as failed, journaling each batch as it ends."""

    def tag(texts: list[str]) -> tuple[dict[str, list[str]], dict[str, str]]:
        todo = [tag_request(t) for t in texts if journal.entries.get(instruction_key(t), {}).get("status") != OK]
        size = backend.batch_size
        chunks = [todo[start : start + size] for start in range(0, len(todo), size)]
        done = len(texts) - len(todo)
        if done:
            print(f"resuming: {done} of {len(texts)} instructions already tagged in {journal.path}", file=sys.stderr)
        bar = tqdm(total=len(texts), initial=done, desc="tagging", unit=" instructions", disable=not progress)
        try:
            with ThreadPoolExecutor(max_workers=max(1, backend.concurrency), thread_name_prefix="tag") as pool:
                for requests, replies in zip(chunks, pool.map(backend.complete, chunks)):
                    journal.append(journal_entry(request, reply) for request, reply in zip(requests, replies))
                    report.requests_now += len(requests)
                    bar.update(len(requests))
        finally:
            bar.close()
        tags, failed = {}, {}
        for text in texts:
            entry = journal.entries[instruction_key(text)]
            report.tokens.update(entry["usage"])
            if entry["status"] == OK:
                tags[text] = entry["tags"]
            else:
                failed[text] = entry["status"]
        return tags, failed

    return tag


def tag_file_by_llm(
    source: str | Path, out: Path, llm: BackendSettings, min_count: int = 1, overwrite: bool = False
) -> tuple[TagReport, bool]:
    """`data tag` with an LLM backend (`llm`): tags every instruction of `source` into `out`; the report, and
    whether every instruction got its tags."""
    from llava_lite.curate.records import read_curate_records
    from llava_lite.data.writing import write_records

    journal_path = out.with_name(out.name + ".journal")
    if out.exists() and not journal_path.exists() and not overwrite:
        raise ValueError(f"{out} already exists; pass --overwrite to tag again")
    records = read_curate_records(source, check_images=False)
    # The journal before the backend: one left with other settings is refused before a model loads for minutes.
    journal = Journal.open(journal_path, _journal_settings(llm), fresh=overwrite)
    report = TagReport()
    backend = None
    try:
        backend = build_backend(llm)
        tag_records(records, llm_tagger(backend, journal, report, sys.stderr.isatty()), min_count, report)
        write_records(out, [record.raw for record in records])
    except KeyboardInterrupt:
        if journal.entries:
            print(f"stopped: {journal_path} keeps what was done - run the same command to resume", file=sys.stderr)
        raise
    finally:
        if backend is not None:
            backend.close()
        if journal.entries:
            journal.close()
        else:
            journal.remove()  # nothing in it: a corrected command need not pass --overwrite
    complete = not report.to_ask_again
    if complete:
        journal_path.unlink(missing_ok=True)
    return report, complete


def _journal_settings(llm: BackendSettings) -> dict:
    """What decides the tags: a journal left by a run with other values is not resumed (the input is not among
    them: entries are keyed by the instruction's text, so an edited input reuses what still applies)."""
    prompt = hashlib.sha1((SYSTEM + PROMPT).encode()).hexdigest()[:12]
    sampling = [llm.temperature, llm.max_tokens]
    return {"tagger": "llm", "backend": llm.backend, "model": llm.model, "prompt": prompt, "sampling": sampling}
