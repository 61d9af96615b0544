"""The rewards registry: every kind on hand-made cases, the weighted sum with None (not applicable), and the checks
that refuse a bad entry in one line."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from rubric_server import ANSWER, RubricServer, user_text

from llava_lite.eval.reward_model import load_reward_model
from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.presets import preset
from llava_lite.model.reward_head import add_reward_head, save_reward_head
from llava_lite.rewards import RewardContext, build_rewards, check_rewards, score_completions, weighted_sum
from llava_lite.rewards.iou import box_score, parse_boxes
from llava_lite.rewards.length import soft_overlong_penalty


def _scores(spec: dict, completions: list[str], each: dict | None = None, **line) -> list:
    """The reward's scores of `completions` to one prompt line (`line`'s fields), with per-completion columns
    (`each`: one value per completion) beside."""
    (reward,) = build_rewards([spec], RewardContext(max_new_tokens=20))
    columns = {key: [value] * len(completions) for key, value in line.items()}
    return reward.function(["question"] * len(completions), completions, **columns, **(each or {}))


# ----- reference --------------------------------------------------------------------------------------------------
def test_reference_matches_after_vqa_normalisation_exact_contains_and_f1():
    answers = ["Two.", "there are two dogs", "two cats"]
    assert _scores({"kind": "reference"}, answers, reference="2") == [1.0, 0.0, 0.0]
    assert _scores({"kind": "reference", "match": "contains"}, answers, reference="two dogs") == [0.0, 1.0, 0.0]
    f1 = _scores({"kind": "reference", "match": "f1"}, answers, reference="two dogs")
    assert f1[0] == pytest.approx(2 * 1.0 * 0.5 / 1.5) and f1[1] == pytest.approx(2 * 0.5 * 1.0 / 1.5)


def test_reference_takes_the_best_of_several_references_and_skips_a_line_without_one():
    assert _scores({"kind": "reference"}, ["blue", "red"], each={"references": [["red", "blue"], None]}) == [1.0, None]


def test_an_answer_pattern_picks_the_answer_and_a_completion_it_does_not_match_scores_0():
    spec = {"kind": "reference", "answer_pattern": r"<answer>(.*?)</answer>"}
    completions = ["<think>it is round</think><answer>circle</answer>", "circle", "<answer>square</answer>"]
    assert _scores(spec, completions, reference="circle") == [1.0, 0.0, 0.0]


# ----- format -----------------------------------------------------------------------------------------------------
def test_format_scores_r1s_layout_by_default_and_any_given_pattern():
    completions = ["<think>a</think>\n<answer>b</answer>", "<answer>b</answer>", " <think>a</think><answer>b</answer> "]
    assert _scores({"kind": "format"}, completions) == [1.0, 0.0, 1.0]
    assert _scores({"kind": "format", "pattern": r"\d+"}, ["42", "42 dogs"]) == [1.0, 0.0]


# ----- iou --------------------------------------------------------------------------------------------------------
def test_two_boxes_written_in_swapped_order_are_matched_one_to_one():
    truth = [[0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.9]]
    completion = "dog at [0.5, 0.5, 0.9, 0.9] and cat at [0.1, 0.1, 0.4, 0.4]"
    assert _scores({"kind": "iou"}, [completion], boxes=truth) == [1.0]
    # One box answering for both is matched once: the other true box is missed.
    assert _scores({"kind": "iou"}, ["[0.1, 0.1, 0.4, 0.4]"], boxes=truth) == [0.5]


def test_a_malformed_box_scores_0_without_an_exception():
    truth = [[0.1, 0.1, 0.4, 0.4]]
    for completion in ["[0.1, x, 0.4, 0.4]", "[0.4, 0.1, 0.1, 0.4]", "[0.1, 0.1, 0.1, 0.4]", "[nan, 0, 1, 1]"]:
        assert _scores({"kind": "iou"}, [completion], boxes=truth) == [0.0], completion
    # Beside a right box, it counts as a box that matches nothing.
    assert _scores({"kind": "iou"}, ["[0.1, 0.1, 0.4, 0.4] [1, 2, oops, 4]"], boxes=truth) == [0.5]


def test_iou_by_hand_and_in_qwen_and_pixel_units():
    truth = [[0.0, 0.0, 0.5, 0.5]]
    # [0, 0, 0.5, 0.25] covers half of the true box: IoU 0.125 / 0.25.
    assert _scores({"kind": "iou"}, ["[0, 0, 0.5, 0.25]"], boxes=truth) == [0.5]
    assert _scores({"kind": "iou", "units": "qwen"}, ["[0, 0, 500, 250]"], boxes=truth) == [0.5]
    pixels = {"kind": "iou", "units": "pixels"}
    # image_sizes are (height, width): a 200 x 100 picture.
    assert _scores(pixels, ["[0, 0, 50, 50]"], boxes=truth, image_sizes=[(200, 100)]) == [0.5]
    assert _scores(pixels, ["[0, 0, 50, 50]"], boxes=truth, image_sizes=[]) == [None]  # no picture to measure


def test_iou_f1_counts_matches_above_the_threshold():
    truth = [[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]
    completion = "[0, 0, 0.5, 0.5] [0.5, 0.5, 1.0, 0.6] [0.2, 0.7, 0.3, 0.8]"  # one hit, one poor match, one extra
    precision, recall = 1 / 3, 1 / 2
    expected = 2 * precision * recall / (precision + recall)
    assert _scores({"kind": "iou", "score": "f1"}, [completion], boxes=truth) == [pytest.approx(expected)]
    assert _scores({"kind": "iou", "score": "f1", "threshold": 0.1}, [completion], boxes=truth) == [
        pytest.approx(2 * (2 / 3) * 1.0 / (2 / 3 + 1.0))
    ]


def test_iou_takes_boxes_in_objects_skips_a_line_without_them_and_names_a_bad_true_box():
    objects = [{"category": "dog", "bbox": [0.1, 0.1, 0.4, 0.4]}]
    assert _scores({"kind": "iou"}, ['{"bbox_2d": [0.1, 0.1, 0.4, 0.4]}'], boxes=objects) == [1.0]
    assert _scores({"kind": "iou", "field": "instances"}, ["[0, 0, 1, 1]"], boxes=objects) == [None]
    with pytest.raises(ValueError, match=r"^line 7: \[1, 2\] is no box"):
        _scores({"kind": "iou"}, ["[0, 0, 1, 1]"], boxes=[[1, 2]], id=7)


def test_no_boxes_wanted_and_none_given_is_right_and_boxes_invented_are_wrong():
    assert box_score([], []) == 1.0 and box_score(parse_boxes("[0, 0, 1, 1]"), []) == 0.0
    assert box_score([], [(0.0, 0.0, 1.0, 1.0)]) == 0.0


# ----- length -----------------------------------------------------------------------------------------------------
def test_length_is_dapos_soft_overlong_penalty():
    assert [soft_overlong_penalty(n, 20, 4) for n in (10, 16, 18, 20, 21)] == [0.0, 0.0, -0.5, -1.0, -1.0]
    ids = [[1] * 10, [1] * 18, [1] * 30]
    assert _scores({"kind": "length", "cache": 4}, ["a", "b", "c"], each={"completion_ids": ids}) == [0.0, -0.5, -1.0]
    # max_length defaults to rl.max_new_tokens (20 here), the cache to a fifth of it.
    assert _scores({"kind": "length"}, ["a"], each={"completion_ids": [[1] * 18]}) == [pytest.approx(-2 / 4)]


# ----- judge ------------------------------------------------------------------------------------------------------
def test_a_judge_scores_each_completion_on_the_rubric_given_what_the_line_says_about_its_image():
    with RubricServer() as server:
        spec = {"kind": "judge", "model": "judge-model", "base_url": server.url, "max_retries": 0, "concurrency": 2}
        line = {"captions": ["A red circle in the top left corner."], "id": "p1"}
        scores = _scores(spec, ["great", "poor", "rambling", "crash", "abc"], **line)
        bodies = list(server.bodies)
    # great: 9 and 7; poor: 2 and 1; no scores in the reply, or a request that failed: not scored; abc: 1 + 3.
    assert scores == [8.0, 1.5, None, None, 4.0]
    seen = {ANSWER.search(user_text(body)).group(1): user_text(body) for body in bodies}
    assert set(seen) == {"great", "poor", "rambling", "crash", "abc"}
    assert "A red circle in the top left corner." in seen["great"] and "question" in seen["great"]
    assert all(body["model"] == "judge-model" and body["temperature"] == 0.0 for body in bodies)


def test_a_judge_needs_a_model_and_a_known_backend():
    with pytest.raises(ValueError, match=r"^rl.rewards\[0\].model: name the judge model"):
        check_rewards([{"kind": "judge"}])
    with pytest.raises(ValueError, match=r"^rl.rewards\[0\].backend: 'vllm' is not one of openai, hf"):
        check_rewards([{"kind": "judge", "model": "m", "backend": "vllm"}])
    with pytest.raises(ValueError, match=r"^rl.rewards\[0\]: the openai backend needs a base URL"):
        build_rewards([{"kind": "judge", "model": "m"}], RewardContext())


# ----- python -----------------------------------------------------------------------------------------------------
REWARD_FILE = """
def shortness(prompts, completions, completion_ids, **columns):
    return [None if columns["id"][i] == "skip" else 1.0 / len(ids) for i, ids in enumerate(completion_ids)]
"""


def test_a_python_function_named_by_path_gets_trls_arguments(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARD_FILE)
    spec = {"kind": "python", "function": f"{path}:shortness"}
    assert _scores(spec, ["a", "b"], each={"completion_ids": [[1, 2], [3]], "id": ["x", "skip"]}) == [0.5, None]


def test_a_python_function_named_by_module(tmp_path, monkeypatch):
    (tmp_path / "module_rewards.py").write_text(REWARD_FILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = {"kind": "python", "function": "module_rewards:shortness"}
    assert _scores(spec, ["a"], each={"completion_ids": [[1, 2, 3, 4]]}, id="x") == [0.25]


def test_a_python_function_inside_a_run_folder_is_never_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "reward.py").write_text("raise SystemExit('ran')\n")
    context = RewardContext(run_folders=[str(run)])
    with pytest.raises(ValueError, match="inside the run folder .*; code from a run folder is never run"):
        build_rewards([{"kind": "python", "function": f"{run / 'reward.py'}:f"}], context)
    with pytest.raises(ValueError, match=r"^rl.rewards\[0\].function: .* has no function missing"):
        (tmp_path / "ok.py").write_text("x = 1\n")
        build_rewards([{"kind": "python", "function": f"{tmp_path / 'ok.py'}:missing"}], RewardContext())


# ----- the registry -----------------------------------------------------------------------------------------------
def test_unknown_kinds_keys_and_values_are_refused_naming_the_entry():
    cases = [
        ([{"kind": "bleu"}], r"^rl.rewards\[0\]: unknown reward kind 'bleu'; choose one of reference, format"),
        ([{"kind": "format"}, {"kind": "reference", "mtach": "f1"}], r"^rl.rewards\[1\]: unknown key\(s\) mtach"),
        ([{"kind": "reference", "match": "fuzzy"}], r"^rl.rewards\[0\].match: 'fuzzy' is not one of exact"),
        ([{"kind": "format", "weight": "high"}], r"^rl.rewards\[0\].weight: expected a number"),
        ([{"kind": "python", "function": "nocolon"}], r"^rl.rewards\[0\].function: expected module:function"),
        ([], r"^rl.rewards: give at least one reward"),
    ]
    for specs, message in cases:
        with pytest.raises(ValueError, match=message):
            check_rewards(specs)


def test_a_reward_model_run_scores_each_completion_after_its_prompt_and_image(tmp_path):
    run = tmp_path / "reward_run"
    model = LlavaLiteModel.from_config(preset("tiny"))
    add_reward_head(model)
    model.save_pretrained(run)
    save_reward_head(model.state_dict(), run)
    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (220, 30, 30)).save(image)
    (reward,) = build_rewards([{"kind": "reward_model", "model": str(run), "batch_size": 2}], RewardContext())
    prompts = ["<image>\nWhat colour is it?"] * 2 + ["Name a colour."]
    completions = ["red", "blue", "green"]
    scores = reward.function(prompts, completions, images=[[str(image)], [str(image)], []])
    expected = load_reward_model(run).score(
        [{"prompt": p, "images": i} for p, i in zip(prompts, [[str(image)], [str(image)], []])], completions
    )
    assert scores == pytest.approx(expected, abs=1e-6) and len(set(scores)) == 3
    with pytest.raises(ValueError, match=r"^rl.rewards\[0\].model: .* is no reward model"):
        build_rewards([{"kind": "reward_model", "model": str(tmp_path)}], RewardContext())


def test_rewards_are_summed_by_weight_over_those_that_apply_and_none_applying_is_nan():
    specs = [{"kind": "reference", "weight": 2.0}, {"kind": "format", "pattern": "ok.*", "weight": 0.5}]
    rewards = build_rewards(specs, RewardContext())
    assert [r.name for r in rewards] == ["reference", "format"]
    completions = ["ok yes", "no", "ok"]
    scores = score_completions(rewards, ["q"] * 3, completions, {"reference": ["ok yes", None, None]})
    assert torch.equal(scores.isnan(), torch.tensor([[False, False], [True, False], [True, False]]))
    total = weighted_sum(scores, rewards)
    assert total.tolist() == [2.0 + 0.5, 0.0, 0.5]
    only_reference = weighted_sum(scores[:, :1], rewards[:1])
    assert only_reference[0] == 2.0 and math.isnan(only_reference[1])
    assert [r.name for r in build_rewards([{"kind": "format"}, {"kind": "format"}], RewardContext())] == [
        "format",
        "format_2",
    ]


def test_a_function_returning_the_wrong_count_or_a_non_number_is_named(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text(
        "def few(prompts, completions, **c):\n    return [1.0]\ndef word(prompts, completions, **c):\n"
        "    return ['good'] * len(completions)\n"
    )
    for name, message in (("few", "returned 1 scores for 2 completions"), ("word", "score 'good' is neither")):
        rewards = build_rewards([{"kind": "python", "function": f"{path}:{name}", "name": name}], RewardContext())
        with pytest.raises(ValueError, match=f"^reward {name}: {message}"):
            score_completions(rewards, ["q", "q"], ["a", "b"], {})
