"""The `reward_model` reward: a run of `recipe: reward` (a Bradley-Terry scalar head on the LM's last hidden state)
scores each completion after its prompt and images, as it scored answers in training
(`llava_lite.eval.reward_model.load_reward_model`). Keys: `model` (the run folder), `batch_size` (completions a
forward pass, default 8), `device` (default the training process's own), `dtype`. The run is loaded once, when the
rewards are built; only its weights are read (safetensors), never code that came with it."""

from __future__ import annotations

from llava_lite.rewards.base import RewardFunction, check_keys, number, rows_of

KEYS = ("model", "batch_size", "device", "dtype")
DTYPES = ("float32", "bfloat16", "float16")


def check(spec: dict, where: str) -> None:
    check_keys(spec, KEYS, where)
    if not isinstance(spec.get("model"), str):
        raise ValueError(f"{where}.model: name the reward model's run folder (a run of recipe: reward)")
    if "batch_size" in spec:
        number(spec, "batch_size", where, minimum=1)
    if spec.get("dtype") not in (None, *DTYPES):
        raise ValueError(f"{where}.dtype: {spec['dtype']!r} is not one of {', '.join(DTYPES)}")


def build(spec: dict, where: str, context) -> RewardFunction:
    from llava_lite.eval.reward_model import load_reward_model  # torch and the model: only when the kind is used

    check(spec, where)
    device = spec.get("device") or context.device or "auto"
    try:
        scorer = load_reward_model(spec["model"], device, spec.get("dtype"), int(spec.get("batch_size", 8)))
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"{where}.model: {err}") from None

    def reward_model_reward(prompts: list, completions: list[str], **columns) -> list[float | None]:
        rows = rows_of(columns, len(completions))
        return scorer.score([_line(prompt, row) for prompt, row in zip(prompts, rows)], completions)

    return reward_model_reward


def _line(prompt, row: dict) -> dict:
    """The prompt as a line the reward model reads: its text or messages, with its images (absolute paths)."""
    line = {"prompt": prompt} if isinstance(prompt, str) else {"messages": prompt}
    if isinstance(row.get("system"), str) and isinstance(prompt, str):
        line["system"] = row["system"]
    return {**line, "images": list(row.get("images") or [])}
