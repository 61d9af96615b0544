"""Files that would hurt if loaded: decompression bombs, pickles where safetensors belong, run folders missing a
part. Each is one line naming the file (exit 2), a counted skip where records may be skipped, and nothing of a
pickle ever runs."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch
import yaml
from conftest import StopAt

from llava_lite.cli import main
from llava_lite.data.errors import BadRecordError
from llava_lite.data.images import image_size_of, load_image
from llava_lite.demo import shapes
from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.presets import preset
from llava_lite.model.weights_files import UnsafeWeightsError


class _Payload:
    """Unpickled unsafely, writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('a pickle ran')",)


def write_pickle(path: Path, marker: Path) -> Path:
    torch.save({"state": _Payload(marker)}, path)
    return path


def one_line(stderr: str, command: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"llava-lite {command}: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


# ----- decompression bombs -----------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(path: Path, side: int = 20_000, real: bool = True) -> Path:
    """A greyscale PNG of side x side pixels: `real` with every row of zeros compressed (a few hundred KB that
    decode to side^2 bytes), else its header alone."""
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
    compressor = zlib.compressobj(9)
    rows = side if real else 1
    row = b"\0" * (side + 1)
    data = b"".join(compressor.compress(row) for _ in range(rows)) + compressor.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bombs")
    bomb_png(folder / "real.png", real=True)
    bomb_png(folder / "header.png", real=False)
    bomb_png(folder / "large.png", side=10_000, real=False)  # over PIL's limit, under its error threshold
    return folder


def test_a_decompression_bomb_is_one_bad_record_read_from_its_header(bombs):
    for name in ("real.png", "header.png", "large.png"):
        for read in (load_image, image_size_of):
            with pytest.raises(BadRecordError) as refused:
                read(bombs / name, "data.json record 3")
            assert refused.value.reason == "image_too_large"
            assert str(refused.value).startswith(f"data.json record 3: image {bombs / name} ")


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory) -> dict[str, Path]:
    return shapes.build_dataset(tmp_path_factory.mktemp("shapes"), 4, 1, 2, seed=0)


def _stage1(tmp_path: Path, data: Path, images: Path, on_bad_record: str, **train) -> Path:
    raw = {
        "recipe": "stage1",
        "model": "tiny",
        "output_dir": str(tmp_path / "run"),
        "data": {"sources": [{"path": str(data), "image_folder": str(images)}], "on_bad_record": on_bad_record},
        "train": {"max_steps": 2, "batch_size": 2, "report_to": "none", **train},
    }
    path = tmp_path / "stage1.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_training_on_bombs_is_one_line_under_error_and_counted_skips_under_skip(
    policy, bombs, shapes_data, tmp_path, capsys
):
    records = json.loads(shapes_data["captions"].read_text())
    for record, name in zip(records, ["real.png", "header.png", "large.png", "real.png"]):
        record["image"] = name
    data = tmp_path / "captions.json"
    data.write_text(json.dumps(records))
    assert main(["train", str(_stage1(tmp_path, data, bombs, policy))]) == 2
    line = one_line(capsys.readouterr().err, "train")
    if policy == "error":
        assert str(data) in line and ("too large to decode" in line or "more than PIL's limit" in line), line
        assert any(str(bombs / name) in line for name in ("real.png", "header.png", "large.png")), line
    else:
        assert line.endswith(f"all {len(records)} were skipped (on_bad_record: skip): image_too_large {len(records)}")


# ----- pickles where safetensors belong --------------------------------------------------------------------


@pytest.fixture
def run_folder(tmp_path) -> Path:
    LlavaLiteModel.from_config(preset("tiny")).save_pretrained(tmp_path / "run")
    return tmp_path / "run"


def _chat(run: Path) -> list[str]:
    return ["chat", "--model", str(run), "--prompt", "Hi", "--max-new-tokens", "2"]


def test_a_pickled_language_model_is_refused_naming_the_file(run_folder, tmp_path, capsys):
    marker = tmp_path / "marker"
    (run_folder / "language_model" / "model.safetensors").unlink()
    pickle = write_pickle(run_folder / "language_model" / "pytorch_model.bin", marker)
    assert main(_chat(run_folder)) == 2
    line = one_line(capsys.readouterr().err, "chat")
    assert str(pickle) in line and "pickle" in line
    assert not marker.exists()


def test_a_pickled_adapter_is_refused_naming_the_file(tmp_path, capsys):
    import peft

    model = LlavaLiteModel.from_config(preset("tiny"))
    model.language_model = peft.get_peft_model(model.language_model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    run = tmp_path / "run"
    model.save_pretrained(run)
    (run / "adapter" / "adapter_model.safetensors").unlink()
    marker = tmp_path / "marker"
    pickle = write_pickle(run / "adapter" / "adapter_model.bin", marker)
    assert main(_chat(run)) == 2
    assert str(pickle) in one_line(capsys.readouterr().err, "chat")
    assert not marker.exists()


def test_an_open_clip_pretrained_pickle_is_refused_naming_the_file(tmp_path):
    marker = tmp_path / "marker"
    config = preset("tiny", vision_tower={"model_config": None, "name": "ViT-B-32"})
    for name in ("weights.bin", "weights.safetensors"):  # a pickle, named as one or as safetensors
        config.vision_tower.pretrained = str(write_pickle(tmp_path / name, marker))
        with pytest.raises(UnsafeWeightsError, match=rf"^{tmp_path / name}: the open_clip tower's pretrained"):
            LlavaLiteModel.from_config(config)
    assert not marker.exists()


def test_a_safetensors_file_that_is_not_one_is_one_line(run_folder, tmp_path, capsys):
    write_pickle(run_folder / "projector.safetensors", tmp_path / "marker")
    assert main(_chat(run_folder)) == 2
    line = one_line(capsys.readouterr().err, "chat")
    assert f"{run_folder / 'projector.safetensors'}: not a readable safetensors file" in line


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, shapes_data) -> Path:
    """A stage-1 run stopped at its checkpoint after step 1 of 2, and its recipe."""
    from llava_lite.train.config import load_train_config
    from llava_lite.train.run import run_training

    folder = tmp_path_factory.mktemp("resume")
    recipe = _stage1(folder, shapes_data["captions"], shapes_data["images"], "error", save_steps=1)
    run_training(load_train_config(recipe), callbacks=[StopAt(1)])
    assert (folder / "run" / "checkpoint-1" / "optimizer.pt").is_file()
    return folder


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pth"])
def test_a_checkpoint_state_file_that_would_run_code_stops_the_resume_in_one_line(name, checkpoint, tmp_path, capsys):
    run = shutil.copytree(checkpoint, tmp_path / "copy")
    recipe = run / "stage1.yaml"
    raw = yaml.safe_load(recipe.read_text())
    raw["output_dir"] = str(run / "run")
    recipe.write_text(yaml.safe_dump(raw))
    marker = tmp_path / "marker"
    state = run / "run" / "checkpoint-1" / name
    write_pickle(state, marker)
    assert main(["train", str(recipe)]) == 2
    line = one_line(capsys.readouterr().err, "train")
    assert line == (
        f"llava-lite train: error: {state}: its pickle would call builtins.exec, not only plain data; "
        "refusing to load it"
    )
    assert not marker.exists()
    state.write_bytes(b"\x80\x04K\x01.")  # a bare pickle, not what torch.save writes
    assert main(["train", str(recipe)]) == 2
    assert "not a file torch.save wrote" in one_line(capsys.readouterr().err, "train")


# ----- a run folder missing a part -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "part", ["vision_tower/vision_tower.safetensors", "projector.safetensors", "language_model", "tokenizer"]
)
def test_a_run_folder_missing_a_part_is_one_line_naming_it(part, run_folder, capsys):
    path = run_folder / part
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert main(_chat(run_folder)) == 2
    line = one_line(capsys.readouterr().err, "chat")
    assert f"{path}: missing" in line


def test_a_tower_whose_source_the_config_names_need_not_be_in_the_folder(tmp_path, capsys):
    """tiny-hf-clip's tower saved as a transformers folder of its own and named by the run's config: the run folder
    without vision_tower/ loads it from there, with the same weights."""
    model = LlavaLiteModel.from_config(preset("tiny-hf-clip"))
    run = tmp_path / "run"
    model.save_pretrained(run)
    model.vision_tower.model.save_pretrained(tmp_path / "clip")
    shutil.rmtree(run / "vision_tower")
    saved = json.loads((run / "llava_lite_config.json").read_text())
    saved["model"]["vision_tower"].update(name=str(tmp_path / "clip"), model_config=None)
    (run / "llava_lite_config.json").write_text(json.dumps(saved))
    loaded = LlavaLiteModel.from_pretrained(run)
    expected, got = model.vision_tower.state_dict(), loaded.vision_tower.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
