"""`llava-lite eval --lm-eval`: lm-evaluation-harness on a run's LM (adapters merged in memory) and on its base, as
lm-eval's own `hf` model scores the same weights saved as folders; the table beside the text perplexity ratio."""

from __future__ import annotations

import json
import sys

import pytest
import yaml
from harness_helpers import ROOT, lora_run

from llava_lite.cli import main
from llava_lite.interop.merge import export_merged
from llava_lite.model.llava import LlavaLiteModel

TASKS = ROOT / "configs" / "eval" / "lm_eval"
TASK = "llava_lite_text_choice"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return lora_run(tmp_path_factory.mktemp("lm_eval") / "run")


@pytest.fixture(autouse=True)
def from_the_checkout(monkeypatch):
    monkeypatch.chdir(ROOT)  # the shipped task names its data relative to the repository root


def log_likelihoods(samples: list[dict]) -> list[list[float]]:
    """Each document's options' log-likelihoods, in document order."""
    ordered = sorted(samples, key=lambda sample: sample["doc_id"])
    return [[float(option[0][0]) for option in sample["resps"]] for sample in ordered]


def test_the_merged_lm_and_its_base_score_as_lm_evals_hf_model_on_the_saved_folders(run, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from llava_lite.eval.lm_eval_bridge import LmEvalSettings, run_lm_eval

    settings = LmEvalSettings(tasks=[TASK], include_path=str(TASKS), batch_size=4, base=True)
    ours = run_lm_eval(LlavaLiteModel.from_pretrained(run), settings, keep_samples=True)
    assert ours["base_source"] == "adapters off"

    merged = export_merged(run, tmp_path / "merged")
    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    for name, folder in (("tuned", merged), ("base", run)):  # a LoRA run saves its (random) base LM beside it
        args = f"pretrained={folder / 'language_model'},tokenizer={run / 'tokenizer'},dtype=float32,device=cpu"
        theirs = simple_evaluate(model="hf", model_args=args, tasks=[TASK], task_manager=manager, batch_size=4)
        expected = log_likelihoods(theirs["samples"][TASK])
        assert log_likelihoods(ours["samples"][name][TASK]) == [pytest.approx(row, rel=1e-5) for row in expected]
        for metric in ("acc", "acc_norm"):
            assert ours[name][TASK][metric] == theirs["results"][TASK][f"{metric},none"]
    tuned, base = (log_likelihoods(ours["samples"][name][TASK]) for name in ("tuned", "base"))
    assert max(abs(t - b) for rt, rb in zip(tuned, base) for t, b in zip(rt, rb)) > 1e-3  # the adapters matter


def test_eval_prints_the_tuned_and_base_table_beside_the_text_perplexity_ratio(run, tmp_path, capsys):
    text = tmp_path / "plain.txt"
    text.write_text("The harbour was quiet in the morning, and the boats rocked slowly on the water. " * 8)
    out = tmp_path / "results.json"
    command = ["eval", "--model", str(run), "--lm-eval", TASK, "--lm-eval-include", str(TASKS), "--base"]
    assert main([*command, "--text", str(text), "--text-window", "32", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert results["text_perplexity"]["ratio"] == pytest.approx(
        results["text_perplexity"]["tuned"] / results["text_perplexity"]["base"]
    )
    lm_eval = results["lm_eval"]
    for metric in ("acc", "acc_norm"):
        tuned, base = lm_eval["tuned"][TASK][metric], lm_eval["base"][TASK][metric]
        assert f"lm-eval {TASK} {metric}" in printed
        assert f"{tuned:.4f}  base {base:.4f}  tuned - base {tuned - base:+.4f}" in printed
    assert "tuned / base" in printed  # the text perplexity ratio, in the same table


def test_without_lm_eval_the_command_says_in_one_line_how_to_install_it(run, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    assert main(["eval", "--model", str(run), "--lm-eval", TASK]) == 2
    assert capsys.readouterr().err == (
        "llava-lite eval: error: --lm-eval needs lm-eval, which is not installed: pip install 'llava_lite[lm-eval]'\n"
    )


def test_base_without_lm_eval_tasks_is_refused(run, capsys):
    assert main(["eval", "--model", str(run), "--text", "x.txt", "--base"]) == 2
    assert "--base compares lm-eval tasks: give --lm-eval TASKS too" in capsys.readouterr().err


def test_a_task_that_runs_the_models_code_is_refused_unless_asked_for(run, tmp_path, capsys):
    task = yaml.safe_load((TASKS / f"{TASK}.yaml").read_text())
    task.update(task="runs_code", unsafe_code=True)
    (tmp_path / "runs_code.yaml").write_text(yaml.safe_dump(task))
    command = ["eval", "--model", str(run), "--lm-eval", "runs_code", "--lm-eval-include", str(tmp_path)]
    assert main([*command, "--limit", "1"]) == 2
    assert "runs_code which is marked as unsafe" in capsys.readouterr().err
    assert main([*command, "--limit", "1", "--lm-eval-unsafe-code"]) == 0
