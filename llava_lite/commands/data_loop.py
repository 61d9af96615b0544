"""`llava-lite data sample`, `data score` and `data pairs`: the self-improvement loop's steps, one command each."""

from __future__ import annotations

import argparse
import json
import sys

from llava_lite.commands._generation_args import add_model_arguments, add_sampling_arguments, add_trust_argument


def register(tools: argparse._SubParsersAction) -> None:
    """Adds the three tools to `llava-lite data`'s subcommands."""
    _register_sample(tools)
    _register_score(tools)
    _register_pairs(tools)


def _register_sample(tools: argparse._SubParsersAction) -> None:
    parser = tools.add_parser(
        "sample",
        help="K answers per prompt from a run (the loop's first step)",
        description=(
            "Sample --samples answers for every line of IN.jsonl - the lines `generate` reads, any other field (a "
            "`reference` answer, captions, boxes) kept - and write one line per prompt with its `candidates`. "
            "Prompts are batched in file order; batch N is sampled with the seed and N, so the same seed gives the "
            "same output, and a run stopped or killed resumes from OUT.journal, sampling nothing twice."
        ),
    )
    add_model_arguments(parser)
    parser.add_argument("--input", required=True, metavar="IN.jsonl")
    parser.add_argument("--output", required=True, metavar="OUT.jsonl")
    parser.add_argument("--image-folder", default=None, help="images of IN.jsonl (default: its folder)")
    parser.add_argument("--samples", type=int, default=4, help="answers per prompt (default: 4)")
    add_sampling_arguments(parser, max_new_tokens=64, temperature=1.0, seed=0)
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per batch (default: 8)")
    parser.add_argument("--overwrite", action="store_true", help="start again, replacing OUT and its journal")
    parser.set_defaults(run=run_sample)


def _register_score(tools: argparse._SubParsersAction) -> None:
    parser = tools.add_parser(
        "score",
        help="a score per sampled candidate: reference answer, LLM judge, or the run itself",
        description=(
            "Score every candidate of a `data sample` file. reference: agreement with the line's `reference` "
            "(VQAv2-normalised exact match, --match contains or f1). judge: an LLM (--backend openai or hf) rates "
            "helpfulness and visual faithfulness 1-10 given the line's captions and boxes; the score is their mean. "
            "self: the run (--model, or served at --base-url) rates its own candidates on the same rubric, seeing "
            "the image. Judged scores are journaled (OUT.journal): a rerun asks only for what is missing or failed."
        ),
    )
    parser.add_argument("--input", required=True, metavar="SAMPLES.jsonl")
    parser.add_argument("--output", required=True, metavar="SCORED.jsonl")
    parser.add_argument("--scorer", choices=["reference", "judge", "self"], default="reference")
    parser.add_argument("--match", choices=["exact", "contains", "f1"], default="exact", help="reference: how")
    parser.add_argument("--backend", choices=["openai", "hf"], default="openai", help="judge: the LLM's backend")
    parser.add_argument("--model", default=None, help="judge: served name or hf folder; self: the run folder")
    parser.add_argument("--base-url", default=None, help="openai backend (judge, or self served): the API base URL")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable with the API key")
    parser.add_argument("--concurrency", type=int, default=4, help="openai: requests in flight (default: 4)")
    parser.add_argument("--max-retries", type=int, default=5, help="openai: retries per request (default: 5)")
    parser.add_argument("--backoff", type=float, default=1.0, help="openai: first retry wait in seconds")
    parser.add_argument("--timeout", type=float, default=120.0, help="openai: seconds to wait for a reply")
    parser.add_argument("--max-tokens", type=int, default=128, help="longest judge reply in tokens (default: 128)")
    parser.add_argument("--batch-size", type=int, default=8, help="hf and self: requests per batch")
    parser.add_argument("--image-folder", default=None, help="self: the images (default: the input's folder)")
    parser.add_argument("--device", default="auto", help="hf and self: cpu, cuda, ...")
    add_trust_argument(parser)
    parser.add_argument("--overwrite", action="store_true", help="start again, replacing OUT and its journal")
    parser.set_defaults(run=run_score)


def _register_pairs(tools: argparse._SubParsersAction) -> None:
    parser = tools.add_parser(
        "pairs",
        help="preference pairs (TRL's format, for stage 3) and best-answer SFT records from scored samples",
        description=(
            "Turn a scored sample file into preference pairs - each prompt's best candidate against its worst, or "
            "(--mode all) every two over --min-gap - in TRL's conversational format, and with --sft the best "
            "answers as SFT records. Identical candidates count once; a pair needs a score gap above 0 and at "
            "least --min-gap; --balance-length drops pairs whose chosen answer is the longer until those are no "
            "more than the others. Prints a summary (or --summary JSON): pairs kept, dropped by reason, score "
            "spread, length ratio, diversity."
        ),
    )
    parser.add_argument("--input", required=True, metavar="SCORED.jsonl")
    parser.add_argument("--output", required=True, metavar="PAIRS.jsonl")
    parser.add_argument("--sft", default=None, metavar="SFT.jsonl", help="also write the best answers as SFT records")
    parser.add_argument("--sft-min-score", type=float, default=None, help="SFT: only bests scoring at least this")
    parser.add_argument("--mode", choices=["best_worst", "all"], default="best_worst")
    parser.add_argument("--min-gap", type=float, default=0.0, help="least score gap of a pair (default: any above 0)")
    parser.add_argument("--balance-length", action="store_true", help="drop pairs so chosen is not mostly longer")
    parser.add_argument("--summary", default=None, metavar="JSON", help="write the summary here as JSON")
    parser.add_argument("--tokenizer", default="tiny", help="tokenizer for the diversity figures (default: tiny)")
    parser.set_defaults(run=run_pairs)


def run_sample(args: argparse.Namespace) -> int:
    from pathlib import Path

    from llava_lite.improve.sample import SampleSettings, check_output, journal_path, sample_file
    from llava_lite.inference.generator import Generator

    settings = SampleSettings(
        args.samples, args.temperature, args.top_p, args.max_new_tokens, args.seed, args.batch_size
    )
    check_output(Path(args.input), Path(args.output), args.overwrite)  # before the model loads
    if journal_path(args.output).exists() and not args.overwrite:
        print(f"resuming from {journal_path(args.output)}", file=sys.stderr)
    generator = Generator.from_folder(args.model, args.device, args.dtype, args.trust_remote_code)
    report = sample_file(
        generator, args.input, args.output, settings, args.image_folder, args.overwrite, progress=sys.stderr.isatty()
    )
    print(
        f"{report.prompts} prompts: {report.sampled} sampled now, {report.already_done} already done, "
        f"{settings.samples} candidates each, {len(report.bad_lines)} bad line(s) -> {args.output}"
    )
    for line in report.bad_lines:
        print(f"  bad: {line}", file=sys.stderr)
    return 1 if report.bad_lines else 0


def run_score(args: argparse.Namespace) -> int:
    from llava_lite.improve.score import score_by_reference

    report = score_by_reference(args.input, args.output, args.match) if args.scorer == "reference" else _judged(args)
    for line in report.lines():
        print(line)
    print(f"-> {args.output}")
    if report.unscored.get("backend_error"):
        print("some requests failed at the backend; rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0


def _judged(args: argparse.Namespace):
    from pathlib import Path

    from llava_lite.improve.config import ScoreSettings
    from llava_lite.improve.judges import judge_for
    from llava_lite.improve.score import score_by_judge, settings_for_journal

    if not args.model:
        raise ValueError(f"--scorer {args.scorer} needs --model (the judge's name or folder, or the run)")
    settings = ScoreSettings(
        scorer=args.scorer,
        backend=args.backend,
        model=args.model,
        base_url=args.base_url,
        api_key_env=args.api_key_env,
        concurrency=args.concurrency,
        max_retries=args.max_retries,
        backoff=args.backoff,
        timeout=args.timeout,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
    )
    folder = args.image_folder or str(Path(args.input).parent)
    backend, messages_for = judge_for(settings, folder, args.device, args.trust_remote_code)
    journal = settings_for_journal(scorer=args.scorer, model=args.model, url=args.base_url)
    return score_by_judge(args.input, args.output, backend, messages_for, journal, args.overwrite)


def run_pairs(args: argparse.Namespace) -> int:
    from llava_lite.data.writing import write_records
    from llava_lite.improve.pairs import PairSettings, build_pairs
    from llava_lite.model.config import LanguageModelConfig
    from llava_lite.model.language_model import load_tokenizer

    settings = PairSettings(args.mode, args.min_gap, args.balance_length, args.sft_min_score)
    tokenizer = load_tokenizer(LanguageModelConfig(name=args.tokenizer))
    rows, sft, summary = build_pairs(args.input, settings, tokenizer)
    write_records(args.output, rows)
    if args.sft:
        write_records(args.sft, sft)
    if args.summary:
        _write_json(args.summary, summary.as_dict())
    for line in summary.lines():
        print(line)
    print(f"-> {args.output}" + (f", {args.sft}" if args.sft else ""))
    return 0


def _write_json(path: str, data: dict) -> None:
    from llava_lite.data.writing import write_lines_atomically

    write_lines_atomically(path, [json.dumps(data, indent=1)])
