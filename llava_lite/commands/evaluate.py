"""`llava-lite eval`: perplexities, VQA accuracy, a judged bench score and lm-eval tasks for a run; plots of a run's
training."""

from __future__ import annotations

import argparse
import json

from llava_lite.config_io import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="measure what training did: perplexities, VQA accuracy, judged bench score",
        description=(
            "Evaluate a run on any of: held-out instruction data (--instruct: perplexity of the assistant tokens "
            "only), plain text (--text: perplexity of the tuned LM and of the base LM from --base-lm, or of the LM "
            "with its adapters off, and their ratio - the forgetting measure), VQA questions (--vqa JSONL: VQAv2-"
            "normalised accuracy and multiple-choice accuracy), a LLaVA-Bench folder (--bench: a judge model "
            "behind an OpenAI-compatible server scores our answers against the reference answers; relative score "
            "per category), and lm-evaluation-harness tasks on the run's LM, adapters merged (--lm-eval; with "
            "--base on the base LM too). Prints a table; --out writes the results as JSON, --plot draws them. "
            "--training-log RUN plots the run's loss and logged perplexities over steps (no --model needed)."
        ),
    )
    parser.add_argument("--model", default=None, help="a run folder, or a transformers Llava folder")
    parser.add_argument("--instruct", default=None, metavar="DATA", help="held-out instruction data (any data format)")
    parser.add_argument("--image-folder", default=None, help="images of --instruct (default: its folder)")
    parser.add_argument("--text", default=None, metavar="TXT", help="plain text for general-text perplexity")
    parser.add_argument("--base-lm", default=None, help="the base LM (transformers folder) to compare --text against")
    parser.add_argument("--text-window", type=int, default=1024, help="tokens per text window (default: 1024)")
    parser.add_argument("--vqa", default=None, metavar="JSONL", help="VQA questions with reference answers")
    parser.add_argument("--vqa-image-folder", default=None, help="images of --vqa (default: its folder)")
    parser.add_argument(
        "--bench", default=None, metavar="DIR", help="a LLaVA-Bench folder (questions, answers, context)"
    )
    parser.add_argument("--bench-images", default=None, help="the bench's images (default: BENCH/images)")
    parser.add_argument("--bench-context", default=None, help="captions-and-boxes context file (COCO bench)")
    parser.add_argument("--bench-answers", default=None, help="our answers generated earlier (question_id, text)")
    parser.add_argument("--judge-base-url", default=None, help="OpenAI-compatible server of the judge, e.g. .../v1")
    parser.add_argument("--judge-model", default=None, help="the judge model's name on that server")
    parser.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="env variable holding the judge's key")
    parser.add_argument("--judge-concurrency", type=int, default=4, help="judge requests in flight (default: 4)")
    parser.add_argument("--judge-temperature", type=float, default=0.2, help="judge sampling temperature (0.2)")
    parser.add_argument("--batch-size", type=int, default=8, help="records per forward or generation batch")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="longest bench answer (default: 512)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N records of each set")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when there is one)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="weights dtype")
    parser.add_argument("--out", default=None, metavar="RESULTS.json", help="write the results here as JSON")
    parser.add_argument("--plot", default=None, metavar="PNG", help="draw metrics by category (and --training-log)")
    parser.add_argument("--training-log", default=None, metavar="RUN", help="a run whose losses and metrics to plot")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    lm_eval = parser.add_argument_group("lm-evaluation-harness on the run's language model (the lm-eval extra)")
    lm_eval.add_argument("--lm-eval", default=None, metavar="TASKS", help="lm-eval tasks, comma-separated (mmlu,...)")
    lm_eval.add_argument("--lm-eval-include", default=None, metavar="DIR", help="a folder of local lm-eval task YAMLs")
    lm_eval.add_argument("--lm-eval-fewshot", type=int, default=None, metavar="N", help="few-shot examples per task")
    lm_eval.add_argument("--lm-eval-chat", action="store_true", help="render prompts with the run's chat template")
    lm_eval.add_argument(
        "--lm-eval-unsafe-code", action="store_true", help="let tasks that run the model's code (HumanEval) run it here"
    )
    lm_eval.add_argument("--base", action="store_true", help="also run them on the base LM (--base-lm or adapters off)")
    parser.set_defaults(run=run)


def eval_config(args: argparse.Namespace):
    from llava_lite.eval.config import EvalConfig

    return EvalConfig(
        instruct=args.instruct,
        image_folder=args.image_folder,
        text=args.text,
        base_lm=args.base_lm,
        text_window=args.text_window,
        vqa=args.vqa,
        vqa_image_folder=args.vqa_image_folder,
        bench=args.bench,
        bench_images=args.bench_images,
        bench_context=args.bench_context,
        bench_answers=args.bench_answers,
        bench_max_new_tokens=args.max_new_tokens,
        judge_base_url=args.judge_base_url,
        judge_model=args.judge_model,
        judge_api_key_env=args.judge_api_key_env,
        judge_concurrency=args.judge_concurrency,
        judge_temperature=args.judge_temperature,
        batch_size=args.batch_size,
        limit=args.limit,
    )


def lm_eval_settings(args: argparse.Namespace):
    """The lm-eval run `--lm-eval` asks for (None without it); checks that lm-eval is installed."""
    if not args.lm_eval:
        if args.base:
            raise ConfigError("--base compares lm-eval tasks: give --lm-eval TASKS too")
        return None
    from llava_lite.eval.lm_eval_bridge import LmEvalSettings

    return LmEvalSettings(
        tasks=args.lm_eval.split(","),
        include_path=args.lm_eval_include,
        num_fewshot=args.lm_eval_fewshot,
        limit=args.limit,
        batch_size=args.batch_size,
        chat_template=args.lm_eval_chat,
        unsafe_code=args.lm_eval_unsafe_code,
        base=args.base,
        base_lm=args.base_lm,
    )


def run(args: argparse.Namespace) -> int:
    from llava_lite.eval import report

    config = eval_config(args)
    lm_eval = lm_eval_settings(args)
    if not (config.anything or lm_eval) and not args.training_log:
        raise ConfigError(
            "nothing to evaluate: give --instruct, --text, --vqa, --bench or --lm-eval (or --training-log RUN)"
        )
    if (config.anything or lm_eval) and not args.model:
        raise ConfigError("--model is needed to evaluate --instruct, --text, --vqa, --bench or --lm-eval")
    results: dict = {}
    if config.anything or lm_eval:
        from llava_lite.inference.generator import Generator

        generator = Generator.from_folder(args.model, args.device, args.dtype)
        results = {"model": args.model}
    if config.anything:
        from llava_lite.eval.suite import run_suite

        results.update(run_suite(generator.model, config, generator=generator))
    if lm_eval:  # last: it merges the run's adapters into its LM
        from llava_lite.eval.lm_eval_bridge import run_lm_eval

        results["lm_eval"] = run_lm_eval(generator.model, lm_eval)
    log = report.read_training_log(args.training_log) if args.training_log else None
    if args.out:
        report.write_results(args.out, results)
    if args.plot:
        report.plot(args.plot, results, log)
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    elif results:
        print(report.table(results))
    for path in (args.out, args.plot):
        if path:
            print(f"wrote {path}")
    return 0
