"""`llava-lite datagen`: image QA data (conversation, detail, reasoning) from captions and boxes, by LLM or offline."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from dataclasses import asdict, replace
from pathlib import Path

from llava_lite.datagen.backends import BACKENDS, Backend
from llava_lite.datagen.filters import DEFAULT_BOUNDS
from llava_lite.datagen.inputs import InputReport, load_annotations
from llava_lite.datagen.pipeline import Generator, Judge, Settings, build_tasks, finish, pending_tasks
from llava_lite.datagen.prompts import JUDGE, KINDS, fingerprint, load_prompts
from llava_lite.datagen.writer import Journal


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "datagen",
        help="generate image QA data from captions and boxes",
        description=textwrap.fill(
            "Show a text-only LLM each image's captions and object boxes and have it write instruction data as "
            "if it saw the image (LLaVA's data engine): multi-turn conversations, detailed descriptions and "
            "reasoning questions. Replies that do not parse, refuse, mention the captions or coordinates, or "
            "break length bounds go to a rejects file with the reason; duplicates are dropped. The output is "
            "LLaVA JSON (.json) or JSONL (.jsonl). An interrupted run resumes where it stopped when it is run "
            "again with the same arguments.",
            width=100,
        ),
        epilog=(
            "examples:\n"
            "  llava-lite datagen --annotations captions_train2017.json --instances instances_train2017.json \\\n"
            "      --images-dir train2017 --backend openai --base-url http://127.0.0.1:8000/v1 --model NAME \\\n"
            "      --concurrency 16 --out llava_instruct.jsonl\n"
            "  llava-lite datagen --annotations caps_boxes.jsonl --backend template --out offline.json"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument(
        "--annotations",
        nargs="+",
        default=[],
        metavar="FILE",
        help="COCO captions (or instances) JSON, or captions-and-boxes records (.jsonl/.json: image, captions, "
        "instances)",
    )
    inputs.add_argument("--instances", nargs="+", default=[], metavar="FILE", help="COCO instances JSON (the boxes)")
    inputs.add_argument(
        "--images-dir", default=None, help="check every image exists here (image paths are relative to it)"
    )
    inputs.add_argument("--limit", type=_at_least(1), default=None, help="use only the first N usable images")

    what = parser.add_argument_group("what to generate")
    what.add_argument(
        "--kinds", default="conversation,detail,reasoning", help="comma-separated, of: " + ", ".join(KINDS)
    )
    what.add_argument("--prompts", default=None, metavar="DIR", help="folder with your own KIND.yaml prompt files")
    what.add_argument("--out", required=True, help="output file: .json (a list, like LLaVA's) or .jsonl")
    what.add_argument("--rejects", default=None, help="rejected replies with reasons (default: OUT_STEM.rejects.jsonl)")
    what.add_argument("--overwrite", action="store_true", help="start again even if OUT or an unfinished run exists")
    what.add_argument(
        "--seed", type=int, default=0, help="picks template questions and detail instructions (default: 0)"
    )

    backend = parser.add_argument_group("backend")
    backend.add_argument("--backend", choices=BACKENDS, default="template", help="default: template (offline)")
    backend.add_argument("--model", default=None, help="openai: the served model name; hf: a local model folder")
    backend.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="openai: the API base URL")
    backend.add_argument("--api-key-env", default="OPENAI_API_KEY", help="openai: environment variable with the key")
    backend.add_argument(
        "--concurrency", type=_at_least(1), default=8, help="openai: requests in flight at once (default: 8)"
    )
    backend.add_argument("--timeout", type=float, default=120.0, help="openai: seconds to wait for a reply")
    backend.add_argument(
        "--max-retries", type=_at_least(0), default=5, help="openai: retries on 429, 5xx, timeouts (default: 5)"
    )
    backend.add_argument("--backoff", type=float, default=1.0, help="openai: first retry wait in seconds, then doubled")
    backend.add_argument(
        "--batch-size", type=_at_least(1), default=8, help="hf: prompts generated together (default: 8)"
    )
    backend.add_argument("--device", default=None, help="hf: cuda, cpu, ... (default: cuda when there is one)")
    backend.add_argument(
        "--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto", help="hf: weights dtype"
    )
    backend.add_argument("--trust-remote-code", action="store_true", help="hf: run the model folder's own code")
    backend.add_argument(
        "--temperature", type=float, default=0.7, help="sampling temperature; 0 is greedy (default 0.7)"
    )
    backend.add_argument("--max-tokens", type=_at_least(1), default=1024, help="longest reply in tokens")

    checks = parser.add_argument_group("filters")
    checks.add_argument("--min-answer-words", type=int, default=None, help="shortest answer kept (default per kind)")
    checks.add_argument("--max-answer-words", type=int, default=None, help="longest answer kept (default per kind)")
    checks.add_argument(
        "--near-duplicate", type=float, default=0.7, help="word-pair similarity that makes a near copy (default 0.7)"
    )
    checks.add_argument("--judge", action="store_true", help="score each record with the same backend; keep the good")
    checks.add_argument("--judge-model", default=None, help="model for --judge (default: --model)")
    checks.add_argument("--judge-threshold", type=float, default=7.0, help="lowest judge score kept, of 10 (default 7)")
    checks.add_argument(
        "--max-consecutive-failures",
        type=_at_least(1),
        default=20,
        help="stop when the backend fails this often in a row",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    kinds = _kinds(args.kinds)
    if not args.annotations and not args.instances:
        raise ValueError("give --annotations and/or --instances")
    if args.judge and args.backend == "template":
        raise ValueError("--judge needs an LLM backend (openai or hf); the template backend cannot judge")
    out = Path(args.out)
    rejects = Path(args.rejects) if args.rejects else out.with_name(f"{out.stem}.rejects.jsonl")
    journal_path = out.with_name(out.name + ".journal")
    if out.exists() and not journal_path.exists() and not args.overwrite:
        raise ValueError(f"{out} already exists; pass --overwrite to generate it again")

    images, report = load_annotations([*args.annotations, *args.instances], args.images_dir, args.limit)
    _print_inputs(report, len(images), args.images_dir)
    if not images:
        raise ValueError("no usable image in the annotations (the problems are listed above)")
    prompts = load_prompts([*kinds, *([JUDGE] if args.judge else [])], args.prompts)
    settings = Settings(_bounds(args, kinds), args.max_consecutive_failures)
    # The journal before the backend: one left with other settings is refused before a model loads for minutes.
    journal = Journal.open(journal_path, _run_settings(args, kinds, prompts, settings), fresh=args.overwrite)
    backends: list[Backend] = []
    try:
        backend = _backend(args, args.model, report)
        backends.append(backend)
        judge = None
        if args.judge:
            judge_backend = backend
            if args.judge_model not in (None, args.model):
                judge_backend = _backend(args, args.judge_model, report)
                backends.append(judge_backend)
            judge = Judge(judge_backend, prompts[JUDGE], args.judge_threshold)
        tasks = build_tasks(images, kinds, prompts, args.seed)
        resumed = len(tasks) - len(pending_tasks(tasks, journal))
        if resumed:
            print(f"resuming: {resumed} of {len(tasks)} tasks already done in {journal_path}", file=sys.stderr)
        Generator(backend, prompts, journal, settings, judge).run(tasks, progress=sys.stderr.isatty())
        summary = finish(tasks, journal, out, rejects, args.near_duplicate)
    except KeyboardInterrupt:
        if journal.entries:
            print(
                f"datagen: stopped; {journal_path} keeps what was done - run the same command to resume",
                file=sys.stderr,
            )
        raise
    finally:
        for each in backends:
            each.close()
        if journal.entries:
            journal.close()  # kept for a rerun to resume (finish() removes it once every task succeeded)
        else:
            journal.remove()  # nothing in it: a rerun with other settings need not pass --overwrite
    print(f"wrote {out} and {rejects}")
    for line in summary.lines():
        print(line)
    if summary.failed:
        print(
            f"{summary.failed} task(s) failed at the backend (in the rejects as backend_error); "
            "rerun the same command to retry them"
        )
        return 1
    return 0


def _kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(
            f"--kinds: unknown kind(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(KINDS)}"
        )
    return list(dict.fromkeys(kinds))


def _bounds(args: argparse.Namespace, kinds: list[str]) -> dict:
    changes = {}
    if args.min_answer_words is not None:
        changes["min_answer_words"] = args.min_answer_words
    if args.max_answer_words is not None:
        changes["max_answer_words"] = args.max_answer_words
    return {kind: replace(DEFAULT_BOUNDS[kind], **changes) for kind in kinds}


def _backend(args: argparse.Namespace, model: str | None, report: InputReport) -> Backend:
    if args.backend == "template":
        from llava_lite.datagen.backends.template import TemplateBackend

        return TemplateBackend(report.vocabulary, args.seed)
    if args.backend == "openai":
        from llava_lite.datagen.backends.openai import OpenAIBackend

        return OpenAIBackend(
            args.base_url,
            model,
            api_key_env=args.api_key_env,
            concurrency=args.concurrency,
            timeout=args.timeout,
            max_retries=args.max_retries,
            backoff=args.backoff,
            temperature=args.temperature,
            max_tokens=args.max_tokens,
        )
    from llava_lite.datagen.backends.hf import HFBackend

    return HFBackend(
        model,
        batch_size=args.batch_size,
        max_new_tokens=args.max_tokens,
        temperature=args.temperature,
        device=args.device,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
        seed=args.seed,
    )


def _run_settings(args, kinds, prompts, settings: Settings) -> dict:
    """What decides the records: a journal left by a run with other values is not resumed."""
    data = {
        "inputs": [[str(Path(f).resolve()), Path(f).stat().st_size] for f in [*args.annotations, *args.instances]],
        "images_dir": args.images_dir,
        "limit": args.limit,
        "kinds": kinds,
        "backend": args.backend,
        "model": args.model if args.backend != "template" else None,
        "sampling": [args.temperature, args.max_tokens] if args.backend != "template" else None,
        "seed": args.seed,
        "prompts": fingerprint(prompts),
        "bounds": {kind: asdict(bounds) for kind, bounds in settings.bounds.items()},
        "judge": [args.judge_model or args.model, args.judge_threshold] if args.judge else None,
    }
    return json.loads(json.dumps(data))  # tuples to lists: equal to what the journal reads back


def _at_least(minimum: int):
    """An argparse type: a whole number of at least `minimum`, else a usage error naming the flag."""

    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number of at least {minimum}, got {text!r}")
        return value

    return whole_number


def _print_inputs(report: InputReport, usable: int, images_dir: str | None) -> None:
    checked = "checked in " + images_dir if images_dir else "not checked (no --images-dir)"
    print(f"inputs: {report.images_listed} images listed, {usable} used; image files {checked}")
    for line in report.lines():
        print(f"  {line}")
