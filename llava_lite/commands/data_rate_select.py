"""`llava-lite data rate` and `data select`: per-record scores from a run or a judge; a subset kept by one rule."""

from __future__ import annotations

import argparse
import sys

from llava_lite.commands._generation_args import add_trust_argument
from llava_lite.commands._llm_args import add_openai_arguments

# llava_lite.curate.select.BY, spelled here so that `--help` imports no torch; the rules that use a run (--model).
SELECT_RULES = ("loss", "ifd", "instag", "quality", "diverse", "random")
RUN_RULES = ("loss", "ifd", "diverse")


def register(tools: argparse._SubParsersAction) -> None:
    """Adds the two tools to `llava-lite data`'s subcommands."""
    _register_rate(tools)
    _register_select(tools)


def _add_run_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--model", default=None, metavar="RUN", help=f"a trained run folder: {what}")
    parser.add_argument("--image-folder", default=None, help="the records' images (default: IN's folder)")
    parser.add_argument("--batch-size", type=int, default=8, help="records per forward pass (default: 8)")
    parser.add_argument("--packed", action="store_true", help="pack each batch into one row (default: padded rows)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when there is one)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="the run's dtype")
    add_trust_argument(parser)


def _register_rate(tools: argparse._SubParsersAction) -> None:
    parser = tools.add_parser(
        "rate",
        help="per-record answer loss, IFD (from a run) and quality (from a judge), added as fields",
        description=(
            "Add scores to every record of IN, written to OUT as the records were read. With --model RUN: "
            "`answer_loss` (mean NLL per answer token given the whole conversation, images included), "
            "`unconditioned_loss` (the same answer tokens with the user turns emptied, no system message, no "
            "images) and `ifd` (their ratio: instruction-following difficulty). With --scorer judge (an LLM) or "
            "self (the run, seeing the images): `quality`, the judge rubric's mean of helpfulness and faithfulness "
            "(1-10), journaled beside OUT so that a rerun asks only for what is missing."
        ),
        epilog="example: llava-lite data rate mix.jsonl --out rated.jsonl --model runs/stage2 --batch-size 16",
    )
    parser.add_argument("input", metavar="IN", help="a data file any loader reads (.json, .jsonl, .parquet, ...)")
    parser.add_argument("--out", required=True, metavar="OUT", help="output file: .json (a list) or .jsonl")
    _add_run_arguments(parser, "answer_loss, unconditioned_loss and ifd (and the self scorer's judge)")
    parser.add_argument("--scorer", choices=["judge", "self", "reward-model"], default=None, help="adds `quality`")
    judge = parser.add_argument_group("the judge (--scorer judge, or reward-model)")
    judge.add_argument("--backend", choices=["openai", "hf"], default="openai", help="the judge LLM's backend")
    judge.add_argument(
        "--judge-model",
        default=None,
        help="the judge's served name, or its hf folder; with --scorer reward-model a run of `recipe: reward`",
    )
    judge.add_argument("--base-url", default=None, help="openai backend: the API base URL")
    add_openai_arguments(judge, concurrency=4)
    judge.add_argument("--max-tokens", type=int, default=128, help="longest judge reply in tokens (default: 128)")
    parser.add_argument("--overwrite", action="store_true", help="judge afresh, dropping the journal beside OUT")
    parser.set_defaults(run=run_rate)


def _register_select(tools: argparse._SubParsersAction) -> None:
    parser = tools.add_parser(
        "select",
        help="keep N records (or a fraction) by loss, IFD, tags, quality, diversity, or at random",
        description=(
            "Keep --keep records of IN (a count, or a fraction such as 0.5) chosen --by: loss (a run's lowest "
            "answer losses: the small-loss rule against noisy labels; --model, or `data rate`'s answer_loss), ifd "
            "(highest IFD below 1), instag (complexity-first diverse sampling over `data tag`'s tags), quality "
            "(highest `quality`), diverse (deita's: by quality, complexity or minus the loss, a record kept only "
            "when its embedding - the run's LM mean hidden state - is farther than --min-distance from every record "
            "kept; needs --model), random (--seed, the baseline). OUT gets the kept records as written, in IN's "
            "order; the summary (printed, and OUT_STEM.summary.json) gives what was kept by source and kind, the "
            "scores of kept and dropped, and `data stats`' diversity figures before and after."
        ),
        epilog="example: llava-lite data select rated.jsonl --out kept.jsonl --keep 0.5 --by loss",
    )
    parser.add_argument("input", metavar="IN", help="a data file any loader reads (.json, .jsonl, .parquet, ...)")
    parser.add_argument("--out", required=True, metavar="OUT", help="output file: .json (a list) or .jsonl")
    parser.add_argument("--keep", required=True, metavar="N|FRACTION", help="records to keep: 1000, or 0.25")
    parser.add_argument("--by", required=True, choices=SELECT_RULES, help="the rule that chooses")
    _add_run_arguments(parser, "its answer losses and embeddings")
    parser.add_argument("--seed", type=int, default=0, help="--by random: which records (default: 0)")
    parser.add_argument(
        "--min-distance", type=float, default=0.1, help="--by diverse: least cosine distance to a kept record (0.1)"
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer for the diversity figures (default: the run's)")
    parser.set_defaults(run=run_select)


def run_rate(args: argparse.Namespace) -> int:
    from llava_lite.curate.rate import RateReport, load_run, rate_with_model
    from llava_lite.curate.records import read_curate_records
    from llava_lite.curate.signals import SignalScorer
    from llava_lite.data.writing import write_records

    if args.model is None and args.scorer is None:
        raise ValueError("nothing to rate: give --model RUN (answer loss, IFD) and/or --scorer judge|self (quality)")
    if args.scorer == "self" and args.model is None:
        raise ValueError("--scorer self needs --model RUN (the run judges the records, seeing their images)")
    if args.scorer == "judge" and not args.judge_model:
        raise ValueError("--scorer judge needs --judge-model (the judge's served name or hf folder)")
    if args.scorer == "reward-model" and not args.judge_model:
        raise ValueError("--scorer reward-model needs --judge-model RUN (a run of `recipe: reward`)")
    # The images are read by the run (its signals, or judging as `self`); a text judge sees only what records say.
    records = read_curate_records(args.input, args.image_folder, check_images=args.model is not None)
    report = RateReport(len(records))
    if args.model is not None:
        model = load_run(args.model, args.device, args.dtype, args.trust_remote_code)
        rate_with_model(records, SignalScorer(model, args.batch_size, args.packed, progress=True), report)
    if args.scorer == "reward-model":
        failed = _rate_by_reward_model(args, records, report)
    else:
        failed = _rate_quality(args, records, report) if args.scorer is not None else 0
    write_records(args.out, [record.raw for record in records])
    for line in report.lines():
        print(line)
    print(f"-> {args.out}")
    if failed:
        print(f"{failed} record(s) not judged (backend errors); rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0


def _rate_quality(args: argparse.Namespace, records: list, report) -> int:
    from pathlib import Path

    from llava_lite.curate.quality import rate_quality
    from llava_lite.improve.config import ScoreSettings

    settings = ScoreSettings(
        scorer=args.scorer,
        backend=args.backend,
        model=args.judge_model if args.scorer == "judge" else args.model,
        base_url=args.base_url if args.scorer == "judge" else None,
        api_key_env=args.api_key_env,
        concurrency=args.concurrency,
        max_retries=args.max_retries,
        backoff=args.backoff,
        timeout=args.timeout,
        deadline=args.deadline,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
    )
    folder = args.image_folder or str(Path(args.input).parent)
    failed, lines = rate_quality(
        records, settings, args.out, folder, args.device, args.trust_remote_code, args.overwrite
    )
    report.fields["quality"] = [r.raw["quality"] for r in records if r.raw["quality"] is not None]
    report.notes += lines
    return failed


def run_select(args: argparse.Namespace) -> int:
    from llava_lite.curate.rate import load_run
    from llava_lite.curate.select import SelectSettings, select_file, summary_path

    settings = SelectSettings(args.by, args.keep, args.seed, args.min_distance, args.batch_size, args.packed)
    tokenizer = None
    if args.tokenizer:
        from llava_lite.model.config import LanguageModelConfig
        from llava_lite.model.language_model import load_tokenizer

        tokenizer = load_tokenizer(LanguageModelConfig(name=args.tokenizer))
    model = None
    if args.model and args.by in RUN_RULES:
        model = load_run(args.model, args.device, args.dtype, args.trust_remote_code)
    elif args.model:
        print(f"--by {args.by} does not use a run; --model {args.model} is not loaded", file=sys.stderr)
    summary = select_file(args.input, args.out, settings, model, args.image_folder, tokenizer)
    for line in summary.lines():
        print(line)
    print(f"-> {args.out}, {summary_path(args.out)}")
    return 0


def _rate_by_reward_model(args: argparse.Namespace, records: list, report) -> int:
    """`quality` as a reward model run scores each record's last answer given all before it; nothing fails."""
    from llava_lite.curate.rate import rate_by_reward_model
    from llava_lite.eval.reward_model import load_reward_model

    scorer = load_reward_model(args.judge_model, args.device, args.dtype, args.batch_size, args.trust_remote_code)
    rate_by_reward_model(records, scorer, report)
    return 0
