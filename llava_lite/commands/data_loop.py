"""`llava-lite data sample`, `data score` and `data pairs`: the self-improvement loop's steps, one command each
(their arguments here; the steps themselves in `llava_lite.improve.steps`, which the loop runs too)."""

from __future__ import annotations

import argparse
import sys

from llava_lite.commands._generation_args import add_model_arguments, add_sampling_arguments, add_trust_argument
from llava_lite.commands._llm_args import add_openai_arguments, at_least


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
        help="a score per sampled candidate: reference answer, LLM judge, the run itself, or a reward model",
        description=(
            "Score every candidate of a `data sample` file. reference: agreement with the line's `reference` "
            "(VQAv2-normalised exact match, --match contains or f1). judge: an LLM (--backend openai or hf) rates "
            "helpfulness and visual faithfulness 1-10 given the line's captions and boxes; the score is their mean. "
            "self: the run (--model, or served at --base-url) rates its own candidates on the same rubric, seeing "
            "the image. Judged scores are journaled (OUT.journal): a rerun asks only for what is missing or failed. "
            "reward-model: a run of `recipe: reward` (--model RUN) scores each candidate after its prompt and image."
        ),
    )
    parser.add_argument("--input", required=True, metavar="SAMPLES.jsonl")
    parser.add_argument("--output", required=True, metavar="SCORED.jsonl")
    parser.add_argument("--scorer", choices=["reference", "judge", "self", "reward-model"], default="reference")
    parser.add_argument("--match", choices=["exact", "contains", "f1"], default="exact", help="reference: how")
    parser.add_argument("--backend", choices=["openai", "hf"], default="openai", help="judge: the LLM's backend")
    parser.add_argument("--model", default=None, help="judge: served name or hf folder; self, reward-model: the run")
    parser.add_argument("--base-url", default=None, help="openai backend (judge, or self served): the API base URL")
    add_openai_arguments(parser, concurrency=4)
    parser.add_argument(
        "--max-tokens", type=at_least(1), default=128, help="longest judge reply in tokens (default: 128)"
    )
    parser.add_argument(
        "--batch-size", type=at_least(1), default=8, help="hf, self: requests per batch; reward-model: candidates"
    )
    parser.add_argument("--image-folder", default=None, help="self, reward-model: the images (default: the input's)")
    parser.add_argument("--device", default="auto", help="hf, self, reward-model: cpu, cuda, ...")
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
    from llava_lite.improve.sample import SampleSettings
    from llava_lite.improve.steps import sample_step

    settings = SampleSettings(
        args.samples, args.temperature, args.top_p, args.max_new_tokens, args.seed, args.batch_size
    )
    report = sample_step(
        args.model,
        args.input,
        args.output,
        settings,
        args.image_folder,
        args.overwrite,
        args.device,
        args.dtype,
        args.trust_remote_code,
        progress=sys.stderr.isatty(),
        log=lambda line: print(line, file=sys.stderr),
    )
    print(
        f"{report.prompts} prompts: {report.sampled} sampled now, {report.already_done} already done, "
        f"{settings.samples} candidates each, {len(report.bad_lines)} bad line(s) -> {args.output}"
    )
    for line in report.bad_lines:
        print(f"  bad: {line}", file=sys.stderr)
    return 1 if report.bad_lines else 0


def run_score(args: argparse.Namespace) -> int:
    from llava_lite.improve.config import ScoreSettings
    from llava_lite.improve.steps import score_step

    if args.scorer != "reference" and not args.model:
        raise ValueError(f"--scorer {args.scorer} needs --model (the judge's name or folder, or the run)")
    settings = ScoreSettings(
        scorer=args.scorer,
        match=args.match,
        backend=args.backend,
        model=args.model,
        base_url=args.base_url,
        api_key_env=args.api_key_env,
        concurrency=args.concurrency,
        max_retries=args.max_retries,
        backoff=args.backoff,
        timeout=args.timeout,
        deadline=args.deadline,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
    )
    report = score_step(
        args.input, args.output, settings, args.image_folder, args.device, args.trust_remote_code, args.overwrite
    )
    for line in report.lines():
        print(line)
    print(f"-> {args.output}")
    if report.failed:
        print(
            "some requests failed (at the backend, or with a malformed reply); rerun the same command to retry them",
            file=sys.stderr,
        )
        return 1
    return 0


def run_pairs(args: argparse.Namespace) -> int:
    from llava_lite.improve.pairs import PairSettings
    from llava_lite.improve.steps import pairs_step

    settings = PairSettings(args.mode, args.min_gap, args.balance_length, args.sft_min_score)
    summary = pairs_step(args.input, args.output, settings, args.sft, args.summary, args.tokenizer)
    for line in summary.lines():
        print(line)
    print(f"-> {args.output}" + (f", {args.sft}" if args.sft else ""))
    return 0
