"""tools/bench_rl.py, TRL's GRPOTrainer against our `recipe: rl`: both sides run and are reported with their ratios
(not their speed, which only a quiet machine can measure), they do the same work on the same prompt tokens, and the
one reward function scores both sides' completion forms alike."""

from __future__ import annotations

import json
import sys

import trl  # noqa: F401  # a dev dependency: the side the benchmark measures ours against
from conftest import FIXTURES, ROOT, run_tool

sys.path.insert(0, str(ROOT / "tools"))
import bench_rl  # noqa: E402


def test_the_quick_benchmark_reports_both_sides_doing_the_same_work_and_their_ratios(tmp_path):
    out = tmp_path / "bench.json"
    stdout = run_tool("bench_rl.py", "--quick", "--json", str(out), timeout=900)
    assert "failed" not in stdout, stdout
    for side in bench_rl.SIDES:
        assert f"\n{side} " in stdout
    assert "ours / trl: completions/s " in stdout and "x (target >= 3), peak memory " in stdout
    report = json.loads(out.read_text())
    settings, sides = report["settings"], report["sides"]
    assert set(sides) == {"trl", "ours", "ours_unshared"}
    for side, result in sides.items():
        # One timed step of 3 prompts (one of them text-only) x 2 answers, each at most 8 tokens.
        assert result["completions"] == settings["steps"] * settings["prompts"] * settings["generations"] == 6, side
        assert 0 < result["mean_length"] <= settings["max_new_tokens"], side
        assert result["completions_per_s"] > 0 and result["peak_mib"] > 0, side
        assert 0 < result["generating"] < 1, side
        assert 0 <= result["reward"] <= 1, side


def test_both_sides_are_given_the_same_prompt_tokens_with_and_without_an_image(tmp_path):
    from transformers import AutoProcessor
    from trl.data_utils import prepare_multimodal_messages

    from llava_lite.config_io import from_dict
    from llava_lite.data.config import DataConfig
    from llava_lite.model.llava import LlavaLiteModel
    from llava_lite.model.processor_for_config import processor_for_config
    from llava_lite.train.rl_prompts import PromptDataset, load_prompt_lines

    prompts = bench_rl.build_prompts(tmp_path, 6)
    start = bench_rl.build_start(tmp_path / "start", str(FIXTURES / "tokenizers" / bench_rl.TOKENIZER), "vicuna_v1")
    lines = [json.loads(line) for line in prompts.read_text(encoding="utf-8").splitlines()]
    assert ["image" in line for line in lines] == [True, True, True, True, False, True]

    model = LlavaLiteModel.from_pretrained(start)
    data = from_dict(DataConfig, {"sources": [{"path": str(prompts), "image_folder": str(tmp_path)}]})
    ours = PromptDataset(load_prompt_lines(data)[0], processor_for_config(model.config, model.tokenizer), 4096, "error")
    processor = AutoProcessor.from_pretrained(start)
    for number, line in enumerate(lines):
        row = bench_rl.trl_row(line, tmp_path)
        messages = prepare_multimodal_messages(row["prompt"], images=row["images"] or None)
        theirs = processor.apply_chat_template([messages], add_generation_prompt=True, tokenize=True, return_dict=True)
        assert list(theirs["input_ids"][0]) == list(ours.encoded[number].input_ids), line
        image_slots = list(theirs["input_ids"][0]).count(model.image_token_id)
        assert image_slots == (196 if "image" in line else 0), line


def test_the_reward_scores_our_text_and_trls_messages_alike():
    texts = ["aeiou", "xyz", "", "Ab 12 cd!"]
    messages = [[{"role": "assistant", "content": text}] for text in texts]
    assert bench_rl.vowel_share(["p"] * 4, texts) == [1.0, 0.0, 0.0, 0.25]
    assert bench_rl.vowel_share(["p"] * 4, messages) == [1.0, 0.0, 0.0, 0.25]
