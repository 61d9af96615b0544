"""Export to transformers' Llava format: the exported folder computes what our model computes, its processor
prepares what our pipeline prepares, and what cannot be represented is refused with the reason."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import open_clip
import pytest
import torch
from conftest import fixture_path, processor_for
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

from llava_lite.cli import main
from llava_lite.data.conversation import Conversation, Message
from llava_lite.data.templates import BUILTIN_FORMATS, get_template
from llava_lite.interop.chat_template import jinja_chat_template
from llava_lite.interop.folders import EXPORT_MARKER
from llava_lite.interop.hf_export import export_hf_llava
from llava_lite.interop.open_clip_to_hf import NotConvertible, clip_vision_config, clip_vision_state_dict
from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.presets import TINY_OPEN_CLIP_TOWER, preset
from llava_lite.model.tiny_tokenizer import TINY_TOKENIZER_DIR

QUESTION = "What is unusual about this picture?"
# tower preset, overrides, image: one transformers CLIP tower, open_clip towers with GELU and with QuickGELU
# (OpenAI's), centre-cropped and padded to a square.
CASES = {
    "hf-clip": ("tiny-hf-clip", {}, "extreme_ironing.jpg"),
    "hf-clip-padded": ("tiny-hf-clip", {"vision_tower": {"image_aspect": "pad"}}, "waterview.jpg"),
    "open-clip-gelu": ("tiny", {}, "extreme_ironing.jpg"),
    "open-clip-quickgelu-padded": (
        "tiny",
        {
            "vision_tower": {"model_config": {"quick_gelu": True}, "image_aspect": "pad"},
            "projector": {"type": "linear"},
        },
        "waterview.jpg",
    ),
}


def exported(case: str, folder) -> tuple[LlavaLiteModel, Image.Image]:
    name, overrides, image = CASES[case]
    torch.manual_seed(0)
    model = LlavaLiteModel.from_config(preset(name, **overrides)).eval()
    export_hf_llava(model, folder)
    return model, Image.open(fixture_path("images", image)).convert("RGB")


def hf_inputs(folder, image: Image.Image) -> dict:
    # open_clip resizes PIL images, as transformers' PIL backend does (see llava_lite.interop.image_processor).
    processor = AutoProcessor.from_pretrained(folder, backend="pil" if "open-clip" in folder.name else None)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"\n{QUESTION}"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=text, images=image, return_tensors="pt", add_special_tokens=False)


def our_inputs(model: LlavaLiteModel, image: Image.Image) -> dict:
    conversation = Conversation([Message("user", f"<image>\n{QUESTION}")], ["image"])
    encoded = processor_for(model).encode(conversation, add_generation_prompt=True)
    return {
        "input_ids": torch.from_numpy(encoded.input_ids)[None],
        "pixel_values": processor_for(model).geometry.preprocessor(image)[None],
    }


@pytest.mark.parametrize("case", list(CASES))
def test_exported_processor_gives_our_ids_and_pixel_values(case, tmp_path):
    model, image = exported(case, tmp_path / case)
    theirs, ours = hf_inputs(tmp_path / case, image), our_inputs(model, image)
    assert torch.equal(theirs["input_ids"], ours["input_ids"])
    assert int((theirs["input_ids"] == model.image_token_id).sum()) == model.vision_tower.num_patches
    assert torch.allclose(theirs["pixel_values"], ours["pixel_values"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_llava_gives_our_logits_and_greedy_answer(case, tmp_path):
    model, image = exported(case, tmp_path / case)
    hf_model, info = LlavaForConditionalGeneration.from_pretrained(tmp_path / case, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    inputs = our_inputs(model, image)
    with torch.no_grad():
        ours = model(**inputs).logits
        theirs = hf_model.eval()(**inputs).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() < 1e-4
    mask = torch.ones_like(inputs["input_ids"])
    our_answer = model.generate(**inputs, attention_mask=mask, max_new_tokens=8, do_sample=False)
    their_answer = hf_model.generate(**inputs, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert their_answer[0, inputs["input_ids"].shape[1] :].tolist() == our_answer[0].tolist()


def test_export_writes_our_feature_layer_strategy_and_image_token(tmp_path):
    overrides = {"vision_tower": {"feature_layer": -1, "cls_token": "keep"}}
    model = LlavaLiteModel.from_config(preset("tiny", **overrides))
    export_hf_llava(model, tmp_path / "out")
    config = LlavaForConditionalGeneration.config_class.from_pretrained(tmp_path / "out")
    assert config.vision_feature_layer == -1
    assert config.vision_feature_select_strategy == "full"
    assert config.image_token_id == model.image_token_id
    assert config.vision_config.hidden_act == "gelu"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.convert_tokens_to_ids("<image>") == model.image_token_id


def test_open_clip_quickgelu_vit_converts_to_clip_hidden_states():
    from transformers import CLIPVisionModel

    config = dict(TINY_OPEN_CLIP_TOWER["model_config"])
    visual = open_clip.CLIP(**config, quick_gelu=True).visual.eval()
    clip = CLIPVisionModel(clip_vision_config(visual)).eval()
    clip.load_state_dict(clip_vision_state_dict(visual), strict=True)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = visual.forward_intermediates(pixels, intermediates_only=True, output_fmt="NLC", output_extra_tokens=True)
        theirs = clip(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert clip.config.hidden_act == "quick_gelu"
    for block, (patches, cls) in enumerate(zip(ours["image_intermediates"], ours["image_intermediates_prefix"])):
        expected = torch.cat([cls, patches], dim=1)
        assert torch.allclose(theirs[block + 1], expected, atol=1e-5), f"block {block}"


@pytest.mark.parametrize(
    ("vision_cfg", "reason"),
    [({"ls_init_value": 0.1}, "layer scale"), ({"no_ln_pre": True}, "no ln_pre"), ({"qk_norm": True}, "block 0")],
)
def test_open_clip_towers_that_do_not_map_are_refused_with_the_reason(vision_cfg, reason):
    config = dict(TINY_OPEN_CLIP_TOWER["model_config"])
    config["vision_cfg"] = {**config["vision_cfg"], **vision_cfg}
    visual = open_clip.CLIP(**config).visual
    with pytest.raises(NotConvertible, match=reason):
        clip_vision_config(visual)


def test_deeper_projector_is_refused_and_nothing_is_written(tmp_path):
    model = LlavaLiteModel.from_config(preset("tiny", projector={"type": "mlp3x_gelu"}))
    with pytest.raises(NotConvertible, match="3 linear layers"):
        export_hf_llava(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_export_command_refuses_with_one_line_and_keeps_a_non_empty_folder(tmp_path, capsys):
    LlavaLiteModel.from_config(preset("tiny", projector={"type": "mlp3x_gelu"})).save_pretrained(tmp_path / "run")
    capsys.readouterr()
    assert main(["export", "--model", str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "o")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "mlp2x_gelu" in error
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    merged = ["export", "--model", str(tmp_path / "run"), "--format", "merged"]
    assert main([*merged, "--out", str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_export_command_writes_a_folder_transformers_loads(tmp_path, capsys):
    LlavaLiteModel.from_config(preset("tiny-hf-clip")).save_pretrained(tmp_path / "run")
    command = ["export", "--model", str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "hf")]
    assert main([*command, "--dtype", "bfloat16"]) == 0
    assert "written to" in capsys.readouterr().out
    hf_model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype="auto")
    assert hf_model.dtype == torch.bfloat16
    assert AutoProcessor.from_pretrained(tmp_path / "hf").image_token == "<image>"


def checksums(folder: Path) -> dict[str, str]:
    """Every file, folder and link under `folder` (links not followed), each with its content's digest."""
    found = {}
    for root, folders, files in os.walk(folder):
        for name in folders + files:
            path = Path(root, name)
            where = str(path.relative_to(folder))
            if path.is_symlink():
                found[where] = f"link to {os.readlink(path)}"
            elif path.is_dir():
                found[where] = "folder"
            else:
                found[where] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("saved") / "run"
    LlavaLiteModel.from_config(preset("tiny-hf-clip")).save_pretrained(run)
    return run


def a_run_in(folder: Path, saved_run: Path) -> Path:
    """A copy of the saved run, with a checkpoint folder in it as training leaves one."""
    run = folder / "run"
    run.mkdir(parents=True)
    for file in saved_run.rglob("*"):
        if file.is_file():
            (run / file.relative_to(saved_run)).parent.mkdir(parents=True, exist_ok=True)
            (run / file.relative_to(saved_run)).write_bytes(file.read_bytes())
    (run / "checkpoint-2").mkdir()
    (run / "checkpoint-2" / "trainer_state.json").write_text("{}")
    return run


OVER_THE_RUN = {
    # where --out points, from the folder holding the run
    "the run": lambda run: run,
    "a folder inside it": lambda run: run / "checkpoint-2",
    "a new folder inside it": lambda run: run / "hf",
    "a link to it": lambda run: _link(run.parent / "link", run),
    "a link to a folder inside it": lambda run: _link(run.parent / "link", run / "checkpoint-2"),
    "the folder holding it": lambda run: run.parent,
}


def _link(link: Path, target: Path) -> Path:
    link.symlink_to(target, target_is_directory=True)
    return link


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
@pytest.mark.parametrize("export_format", ["hf", "merged"])
@pytest.mark.parametrize("where", list(OVER_THE_RUN))
def test_export_never_writes_over_its_run(tmp_path, saved_run, capsys, where, export_format, overwrite):
    run = a_run_in(tmp_path / "runs", saved_run)
    out = OVER_THE_RUN[where](run)
    before = checksums(tmp_path)
    capsys.readouterr()
    assert main(["export", "--model", str(run), "--format", export_format, "--out", str(out), *overwrite]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "reads" in error and str(out) in error, error
    assert checksums(tmp_path) == before


@pytest.mark.parametrize("export_format", ["hf", "merged"])
def test_overwrite_never_replaces_a_folder_export_did_not_write(tmp_path, saved_run, capsys, export_format):
    run = a_run_in(tmp_path / "runs", saved_run)
    mine = tmp_path / "notes"
    (mine / "drafts").mkdir(parents=True)
    (mine / "drafts" / "plan.txt").write_text("mine")
    (mine / "config.json").write_text("{}")
    before = checksums(tmp_path)
    capsys.readouterr()
    for overwrite in ([], ["--overwrite"]):
        command = ["export", "--model", str(run), "--format", export_format, "--out", str(mine), *overwrite]
        assert main(command) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and str(mine) in error, error
        assert (EXPORT_MARKER in error) == bool(overwrite), error
    assert checksums(tmp_path) == before


@pytest.mark.parametrize("export_format", ["hf", "merged"])
def test_overwrite_replaces_an_earlier_export(tmp_path, saved_run, capsys, export_format):
    run = a_run_in(tmp_path / "runs", saved_run)
    run_before = checksums(run)
    out = tmp_path / "exported"
    command = ["export", "--model", str(run), "--format", export_format, "--out", str(out)]
    assert main(command) == 0
    assert (out / EXPORT_MARKER).is_file()
    (out / "stale.txt").write_text("from an older export")
    assert main(command) == 2  # not without --overwrite
    assert "not empty" in capsys.readouterr().err
    assert main([*command, "--overwrite"]) == 0
    assert (out / EXPORT_MARKER).is_file() and not (out / "stale.txt").exists()
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []  # no staging left
    assert checksums(run) == run_before
    if export_format == "hf":
        assert LlavaForConditionalGeneration.from_pretrained(out).config.image_token_id is not None
    else:
        exported_weights = LlavaLiteModel.from_pretrained(out).state_dict()
        run_weights = LlavaLiteModel.from_pretrained(run).state_dict()
        assert exported_weights.keys() == run_weights.keys()
        assert all(torch.equal(exported_weights[name], run_weights[name]) for name in run_weights)


TOKENIZERS = {"tiny": str(TINY_TOKENIZER_DIR), "llama2": None, "qwen2.5": None}


@pytest.mark.parametrize("tokenizer_name", list(TOKENIZERS))
def test_exported_chat_template_renders_as_ours_for_every_template(tokenizer_name):
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS[tokenizer_name] or fixture_path("tokenizers", tokenizer_name))
    conversations = [
        [Message("user", '<image>\nWhat is "this"? é'), Message("assistant", "A cat.\nYes."), Message("user", "Why?")],
        [Message("system", "Be brief."), Message("user", "Hi <image>"), Message("assistant", "Hello")],
    ]
    names = [*BUILTIN_FORMATS, *(["tokenizer"] if tokenizer.chat_template else [])]
    for name in names:
        template = get_template(name, tokenizer)
        jinja = jinja_chat_template(template, tokenizer, "<image>")
        for messages in conversations:
            for prompt in (False, True):
                turns = messages[:-1] if prompt and messages[-1].role == "assistant" else messages
                ours = template.render(turns, add_generation_prompt=prompt).text
                as_dicts = [{"role": m.role, "content": m.content} for m in turns]
                theirs = tokenizer.apply_chat_template(
                    as_dicts, chat_template=jinja, tokenize=False, add_generation_prompt=prompt
                )
                assert theirs == ours, f"{name}, generation prompt {prompt}"


def test_exported_chat_template_takes_content_parts_like_strings():
    tokenizer = AutoTokenizer.from_pretrained(fixture_path("tokenizers", "llama2"))
    template = get_template("vicuna_v1", tokenizer)
    jinja = jinja_chat_template(template, tokenizer, "<image>")
    parts = [{"type": "image"}, {"type": "text", "text": "\nWhat is it?"}, {"type": "image"}]
    as_parts = tokenizer.apply_chat_template([{"role": "user", "content": parts}], chat_template=jinja, tokenize=False)
    as_string = tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\nWhat is it?<image>"}], chat_template=jinja, tokenize=False
    )
    assert as_parts == as_string
    assert as_string.count("<image>") == 2


def test_open_clip_preprocessing_without_an_image_processor_equivalent_is_refused():
    from llava_lite.interop.image_processor import open_clip_settings

    settings = {"size": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"}
    assert open_clip_settings({**settings, "resize_mode": "squash"})["do_center_crop"] is False
    with pytest.raises(NotConvertible, match="pads after resizing"):
        open_clip_settings({**settings, "resize_mode": "longest"})
