"""A real `llava-lite serve` process on 127.0.0.1 for the serving tests, and the small trained model it serves.

One server is started per test session, the first time a test asks for it, and every serving test module
shares it: starting one (importing torch, loading the model) is most of what these tests cost.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from conftest import ROOT, fixture_path, processor_for
from PIL import Image

from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.presets import preset
from llava_lite.serve.config import API_KEY_ENV

API_KEY = "test-key-0123"
MODEL_NAME = "tiny-run"
QUESTION = "What is in this picture?"
QUEUE_DEPTH = 31  # with one generation at a time: 32 requests in the server at once, the 33rd refused
MAX_TOKENS_LIMIT = 2000
START_TIMEOUT = 180  # seconds; a cold start on a slow two-core machine takes well under this


def make_run_folder(folder: Path) -> Path:
    """A trained run folder as `llava-lite train` leaves it, with seeded random weights.

    The LM's output layer is untied from its input embeddings: with tied random weights, greedy decoding just
    repeats the prompt's last token (a newline), and every answer would be empty. Its rows for the end-of-text
    and end-of-turn tokens are zero, so their logit is 0 and never the largest: answers never end by themselves,
    every answer runs to `max_tokens`, and a long stream stays long."""
    torch.manual_seed(0)
    config = preset("tiny", language_model={"model_config": {"tie_word_embeddings": False}})
    model = LlavaLiteModel.from_config(config)
    tokenizer = model.tokenizer
    end_of_turn = processor_for(model).template.end_of_turn.strip()
    enders = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(end_of_turn)}
    with torch.no_grad():
        for token in enders - {None, tokenizer.unk_token_id}:
            model.language_model.get_output_embeddings().weight[token] = 0
    model.save_pretrained(folder)
    return folder


def data_uri(path: Path, media_type: str = "image/jpeg") -> str:
    return f"data:{media_type};base64,{base64.b64encode(path.read_bytes()).decode()}"


def png_data_uri(size: tuple[int, int] = (8, 8), colour: tuple[int, int, int] = (200, 30, 30)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"


def image_question(image_url: str, question: str = QUESTION) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": image_url}}],
        }
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    def __init__(self, model: Path, args: list[str], log_path: Path, api_key: str | None = None) -> None:
        self.port = free_port()
        self.api_key = api_key
        self.log_path = log_path
        command = [sys.executable, "-m", "llava_lite", "serve", "--model", str(model), "--port", str(self.port)]
        command += ["--served-model-name", MODEL_NAME, *args]
        env = {**os.environ, API_KEY_ENV: api_key or ""}
        self._log = open(log_path, "w")  # noqa: SIM115 - open for the life of the process
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self._ready = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def wait_ready(self) -> ServerProcess:
        deadline = time.monotonic() + START_TIMEOUT
        while not self._ready:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):  # not listening yet
                self._ready = httpx.get(f"{self.url}/health", timeout=2).status_code == 200
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not answer /health within {START_TIMEOUT} s:\n{self.log()[-4000:]}")
            time.sleep(0.2)
        return self

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)
        self._log.close()


_SESSION: dict[str, object] = {}


def shared_server(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    """The server every serving test talks to, started on the first call and stopped when the session ends:
    an API key (from the environment variable), an image root, tight request limits, and one generation at a
    time with 31 requests waiting - room for 32 clients at once, and a line a test can fill."""
    if "server" not in _SESSION:
        base = tmp_path_factory.mktemp("serve")
        model = make_run_folder(base / "run")
        images = base / "images"
        images.mkdir()
        shutil.copyfile(fixture_path("images", "waterview.jpg"), images / "waterview.jpg")
        (base / "secret.jpg").write_bytes((images / "waterview.jpg").read_bytes())  # outside the root
        args = [
            "--image-root", str(images), "--max-images", "2", "--max-body-bytes", "3000000",
            "--max-image-bytes", "1000000", "--max-image-pixels", "4000000", "--max-prompt-tokens", "400",
            "--max-tokens-limit", str(MAX_TOKENS_LIMIT), "--default-max-tokens", "16",
            "--concurrency", "1", "--queue-depth", str(QUEUE_DEPTH), "--max-batch-size", "8",
        ]  # fmt: skip
        process = ServerProcess(model, args, base / "server.log", api_key=API_KEY)
        config.add_cleanup(process.stop)
        _SESSION.update(server=process, base=base, model=model, images=images)
    return _SESSION["server"].wait_ready()  # type: ignore[union-attr]


def session_paths() -> dict[str, Path]:
    """The run folder, the image root and the folder holding both (after `shared_server` was called)."""
    return {key: _SESSION[key] for key in ("base", "model", "images")}  # type: ignore[misc]
