"""`llava-lite eval`: perplexities, VQA accuracy, a judged bench score and lm-eval tasks for a run; plots of a run's
training."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llava_lite.config_io import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="measure what training did: perplexities, VQA accuracy, judged bench score, preference accuracy",
        description=(
            "Evaluate a run on any of: held-out instruction data (--instruct: perplexity of the assistant tokens "
            "only), plain text (--text: perplexity of the tuned LM and of the base LM from --base-lm, or of the LM "
            "with its adapters off, and their ratio - the forgetting measure), VQA questions (--vqa JSONL: VQAv2-"
            "normalised accuracy and multiple-choice accuracy), a LLaVA-Bench folder (--bench: a judge model "
            "behind an OpenAI-compatible server scores our answers against the reference answers; relative score "
            "per category), lm-evaluation-harness tasks on the run's LM, adapters merged (--lm-eval; with "
            "--base on the base LM too), and held-out preference pairs (--preference FILE, any format stage 3 "
            "reads: the share of pairs whose chosen answer the run prefers against its reference, and the mean "
            "margin; the reference is --reference, else the run's init_from, else the run with its adapters off; "
            "a reward model run, recipe: reward, is measured by its head's scores: the share of pairs it ranks right). "
            "Judged by a model behind an OpenAI-compatible server (the --judge-* flags): MT-Bench questions "
            "(--mt-bench FILE: every turn answered in the context of the model's earlier answers, a 1-10 score per "
            "answer; means per turn and category), and a pairwise comparison (--versus BASELINE --prompts FILE: "
            "the baseline is another run or a file of reference answers; win rate, tie rate, length-controlled win "
            "rate, 95% bootstrap intervals; each pair judged in both orders). Both keep their answers and the "
            "judge's verdicts beside --out, and a rerun asks only for what is missing. "
            "Prints a table; --out writes the results as JSON, --plot draws them. "
            "--training-log RUN plots the run's loss and logged perplexities over steps (no --model needed)."
        ),
    )
    parser.add_argument("--model", default=None, help="a run folder, or a transformers Llava folder")
    parser.add_argument("--instruct", default=None, metavar="DATA", help="held-out instruction data (any data format)")
    parser.add_argument(
        "--image-folder", default=None, help="images of --instruct, --mt-bench, --prompts (default: each file's folder)"
    )
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
    parser.add_argument(
        "--judge-images", action="store_true", help="send visual questions' images to the judge (a vision judge)"
    )
    parser.add_argument("--mt-bench", default=None, metavar="FILE", help="MT-Bench questions (question_id, turns, ...)")
    parser.add_argument(
        "--versus",
        default=None,
        metavar="BASELINE",
        help="pairwise win rate against a run folder, or a file of reference answers (instruction, output)",
    )
    parser.add_argument(
        "--prompts", default=None, metavar="FILE", help="the prompts of --versus (default: the baseline's answer file)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of --versus' bootstrap intervals (default: 0)")
    parser.add_argument("--preference", default=None, metavar="PAIRS", help="held-out preference pairs (stage 3)")
    parser.add_argument("--preference-images", default=None, help="images of --preference (default: its folder)")
    parser.add_argument("--reference", default=None, help="the reference model of --preference (default: init_from)")
    parser.add_argument("--batch-size", type=int, default=8, help="records per forward or generation batch")
    parser.add_argument(
        "--max-new-tokens", type=int, default=512, help="longest bench, MT-Bench or --versus answer (default: 512)"
    )
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
    from llava_lite.eval.run import EvalRequest, PreferenceRequest, run_evaluations

    preference = None
    if args.preference:
        preference = PreferenceRequest(args.preference, args.preference_images, args.reference)
    request = EvalRequest(
        model=args.model,
        suite=eval_config(args),
        lm_eval=lm_eval_settings(args),
        preference=preference,
        judged=judged_request(args),
        device=args.device,
        dtype=args.dtype,
        max_new_tokens=args.max_new_tokens,
    )
    if not request.anything and not args.training_log:
        raise ConfigError(
            "nothing to evaluate: give --instruct, --text, --vqa, --bench, --lm-eval, --preference, --mt-bench or "
            "--versus (or --training-log RUN)"
        )
    if request.anything and not args.model:
        raise ConfigError(
            "--model is needed to evaluate --instruct, --text, --vqa, --bench, --lm-eval, --preference, --mt-bench "
            "or --versus"
        )
    results = run_evaluations(request)
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


def judged_request(args: argparse.Namespace):
    """The MT-Bench and pairwise request (None when neither is asked for), after checking what they need (before
    any model loads)."""
    if args.prompts and not args.versus:
        raise ConfigError("--prompts are the prompts of --versus BASELINE: give --versus too")
    if not (args.mt_bench or args.versus):
        return None
    if not args.out:
        raise ConfigError(
            "--mt-bench and --versus keep their answers and the judge's verdicts beside the results: give --out "
            "RESULTS.json"
        )
    if not (args.judge_base_url and args.judge_model):
        raise ConfigError(
            "--mt-bench and --versus are judged: give --judge-base-url and --judge-model (the judge's server and name)"
        )
    if args.versus and Path(args.versus).is_dir() and not args.prompts:
        raise ConfigError("--versus RUN needs --prompts FILE: the prompts both runs answer")
    if args.versus and not Path(args.versus).exists():
        raise ConfigError(f"--versus {args.versus}: no such run folder or reference answers file")
    from llava_lite.eval.judge_calls import JudgeSettings
    from llava_lite.eval.run import JudgedRequest

    judge = JudgeSettings(
        args.judge_base_url,
        args.judge_model,
        api_key_env=args.judge_api_key_env,
        concurrency=args.judge_concurrency,
        temperature=args.judge_temperature,
        images=args.judge_images,
    )
    return JudgedRequest(judge, args.out, args.mt_bench, args.versus, args.prompts, args.seed)
