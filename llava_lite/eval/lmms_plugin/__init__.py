"""llava_lite as a model of lmms-eval (`lmms-eval --model llava_lite --model_args pretrained=RUN ...`).

lmms-eval 0.7 finds third-party models through the `lmms_eval.models` entry point group (see pyproject.toml): each
entry point names a `ModelManifest`, or a callable returning one, with the import paths of the model's classes.
`manifest` is that callable; it is loaded whenever lmms-eval builds its model registry, so it imports nothing
but lmms-eval's registry - the model classes (`model.py`) load only when lmms-eval picks `llava_lite`.

Two classes, as lmms-eval's own models have: the chat one (its default) answers generation tasks from the
task's chat messages; the simple one (`--force_simple`) takes a task's text and images and also answers
`loglikelihood` requests, which multiple-choice tasks make.
"""

from __future__ import annotations

MODEL_ID = "llava_lite"


def manifest():
    """The `ModelManifest` lmms-eval registers for `--model llava_lite`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(
        model_id=MODEL_ID,
        simple_class_path="llava_lite.eval.lmms_plugin.model.LlavaLiteSimple",
        chat_class_path="llava_lite.eval.lmms_plugin.model.LlavaLiteChat",
    )
