"""Evaluation results for people: a table on the terminal, a JSON file, and plots - metrics by category, and
loss and perplexities over the training steps of a run."""

from __future__ import annotations

import json
from pathlib import Path

from llava_lite.data.writing import write_lines_atomically
from llava_lite.run_folder import CHECKPOINT_PREFIX, TRAINER_STATE_FILE, checkpoints, read_trainer_state

# Training-log keys drawn as curves: the Trainer's losses and what the evaluation callback logs.
CURVE_KEYS = ("loss", "eval_loss", "response_perplexity", "text_perplexity", "text_perplexity_base")


def write_results(path: str | Path, results: dict) -> None:
    write_lines_atomically(path, [json.dumps(results, indent=2, ensure_ascii=False)])


def table(results: dict) -> str:
    rows: list[tuple[str, str]] = []
    if "response_perplexity" in results:
        r = results["response_perplexity"]
        rows.append(
            ("response perplexity", f"{r['perplexity']:.3f}  ({r['tokens']} answer tokens, {r['records']} records)")
        )
    if "text_perplexity" in results:
        t = results["text_perplexity"]
        rows.append(("text perplexity, tuned", f"{t['tuned']:.3f}  ({t['tokens']} tokens, {t['windows']} windows)"))
        if t["base"] is not None:
            rows.append(("text perplexity, base", f"{t['base']:.3f}  ({t['base_source']})"))
            rows.append(("  tuned / base", f"{t['ratio']:.3f}  (above 1: plain text got harder)"))
    if "vqa" in results:
        v = results["vqa"]
        rows.append(("VQA accuracy", f"{100 * v['accuracy']:.1f}%  ({v['count']} questions)"))
        for kind in ("open", "multiple_choice"):
            if f"{kind}_accuracy" in v:
                rows.append((f"  {kind.replace('_', ' ')}", f"{100 * v[f'{kind}_accuracy']:.1f}%"))
        for name, c in v["by_category"].items():
            rows.append((f"  {name}", f"{100 * c['accuracy']:.1f}%  ({c['count']})"))
    if "bench" in results:
        b = results["bench"]
        rows.append(
            ("bench relative score", f"{_percent(b['relative'])}  ({b['judged']} judged, {b['failed']} failed)")
        )
        for name, c in b["by_category"].items():
            rows.append(
                (f"  {name}", f"{_percent(c['relative'])}  (ours {c['ours']:.2f} / reference {c['reference']:.2f})")
            )
    if "preference" in results:
        p = results["preference"]
        rows.append(
            ("preference accuracy", f"{100 * p['accuracy']:.1f}%  ({p['pairs']} pairs, against {p['reference']})")
        )
        rows.append(("  mean margin", f"{p['mean_margin']:.4f}  (x beta {p['beta']:g}: {p['mean_reward_margin']:.4f})"))
    if "mt_bench" in results:
        from llava_lite.eval import mt_bench

        rows += mt_bench.table_rows(results["mt_bench"])
    if "versus" in results:
        from llava_lite.eval import versus

        rows += versus.table_rows(results["versus"])
    if "lm_eval" in results:
        from llava_lite.eval.lm_eval_bridge import table_rows

        rows += table_rows(results["lm_eval"])
    width = max((len(name) for name, _ in rows), default=0)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def read_training_log(run: str | Path) -> list[dict]:
    """The Trainer's log history of a run: its final trainer state, or that of its newest checkpoint that has one."""
    run = Path(run)
    for folder in [run, *reversed(checkpoints(run))]:
        state = read_trainer_state(folder)
        if state is None:
            continue
        if "log_history" not in state:
            raise ValueError(f"{folder / TRAINER_STATE_FILE}: not a trainer state (no log_history)")
        return state["log_history"]
    raise ValueError(f"{run}: no {TRAINER_STATE_FILE} in it or in a {CHECKPOINT_PREFIX}STEP folder")


def plot(path: str | Path, results: dict | None = None, training_log: list[dict] | None = None) -> None:
    """Bars of each metric by category, and curves of loss and perplexities over steps; one panel each."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'llava_lite[plot]'") from None
    panels = category_panels(results or {})
    curves = _curves(training_log or [])
    if not panels and not curves:
        raise ValueError("nothing to plot: no results by category and no training log with losses")
    count = len(panels) + (1 if curves else 0)
    figure, axes = plt.subplots(1, count, figsize=(5.5 * count, 4), squeeze=False)
    axes = list(axes[0])
    for axis, (title, unit, values) in zip(axes, panels):
        axis.bar(list(values), list(values.values()), color="tab:blue")
        axis.set(title=title, ylabel=unit)
    if curves:
        _draw_curves(axes[-1], curves)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


def category_panels(results: dict) -> list[tuple[str, str, dict[str, float]]]:
    panels = []
    bench = results.get("bench")
    if bench and any(c["relative"] is not None for c in bench["by_category"].values()):
        values = {k: c["relative"] for k, c in bench["by_category"].items() if c["relative"] is not None}
        panels.append(("bench: ours relative to the reference", "%", values))
    vqa = results.get("vqa")
    if vqa:
        values = {k: 100 * c["accuracy"] for k, c in vqa["by_category"].items()}
        if not values:
            values = {k.removesuffix("_accuracy"): 100 * v for k, v in vqa.items() if k.endswith("_accuracy")}
        panels.append(("VQA accuracy", "%", values))
    mt_bench = results.get("mt_bench")
    if mt_bench:
        values = {f"turn {turn}": score for turn, score in mt_bench["turns"].items() if score is not None}
        values.update({k: c["score"] for k, c in mt_bench["by_category"].items() if c["score"] is not None})
        if values:
            panels.append(("MT-Bench score by turn and category", "score (1-10)", values))
    versus = results.get("versus")
    if versus:
        values = {k: 100 * c["win_rate"] for k, c in versus["by_category"].items() if c["win_rate"] is not None}
        if versus["win_rate"] is not None:
            values = {"all": 100 * versus["win_rate"], **values}
        if values:
            panels.append((f"win rate against {versus['baseline']}", "%", values))
    return panels


def _curves(log: list[dict]) -> dict[str, list[tuple[int, float]]]:
    curves: dict[str, list[tuple[int, float]]] = {}
    for entry in log:
        for key in CURVE_KEYS:
            if key in entry and "step" in entry:
                curves.setdefault(key, []).append((entry["step"], float(entry[key])))
    return curves


def _draw_curves(axis, curves: dict[str, list[tuple[int, float]]]) -> None:
    losses = {k: v for k, v in curves.items() if k.endswith("loss")}
    others = {k: v for k, v in curves.items() if not k.endswith("loss")}
    for key, points in losses.items():
        axis.plot(*zip(*points), label=key, marker=".")
    axis.set(title="training", xlabel="step", ylabel="loss")
    if others:
        # Perplexities live on another scale than losses; they get their own axis on the right.
        right = axis.twinx() if losses else axis
        for key, points in others.items():
            right.plot(*zip(*points), label=key, linestyle="--", marker="o")
        right.set_ylabel("perplexity")
        handles = axis.get_legend_handles_labels()
        extra = right.get_legend_handles_labels() if right is not axis else ([], [])
        axis.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize="small")
    else:
        axis.legend(fontsize="small")


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}%"
