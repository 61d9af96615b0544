// The chat page's behaviour: keep the conversation as OpenAI messages, send it to /v1/chat/completions with
// stream: true, and show the answer as its server-sent events arrive. Images go as data: URIs with the
// user turn they were attached to, so the history the server sees is the history the page shows.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, history: [], image: null, controller: null };

const KEY_STORE = "llava_lite.api_key"; // this tab only: sessionStorage, never a cookie
$("api-key").value = sessionStorage.getItem(KEY_STORE) || "";
$("api-key").addEventListener("change", () => {
  sessionStorage.setItem(KEY_STORE, $("api-key").value);
  loadModel();
});

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error ? body.error.message : `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

async function loadModel() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) {
    $("model").textContent = response.status === 401 ? "(enter the API key)" : "(no model)";
    return;
  }
  state.model = (await response.json()).data[0].id;
  $("model").textContent = state.model;
}

// ----- the image that goes with the next message ------------------------------------------------------
function setImage(file) {
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    state.image = reader.result;
    $("preview").src = state.image;
    $("preview").hidden = false;
    $("remove-image").hidden = false;
    $("drop-hint").textContent = file.name;
  };
  reader.readAsDataURL(file);
}

function clearImage() {
  state.image = null;
  $("preview").hidden = true;
  $("preview").removeAttribute("src");
  $("remove-image").hidden = true;
  $("drop-hint").textContent = "Drop an image here or";
  $("image-input").value = "";
}

$("image-input").addEventListener("change", (e) => setImage(e.target.files[0]));
$("remove-image").addEventListener("click", clearImage);
const zone = $("drop-zone");
zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
zone.addEventListener("dragleave", () => zone.classList.remove("over"));
zone.addEventListener("drop", (e) => {
  e.preventDefault();
  zone.classList.remove("over");
  setImage(e.dataTransfer.files[0]);
});

// ----- the conversation -----------------------------------------------------------------------------------
function show(role, text, image) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  if (image) {
    const img = document.createElement("img");
    img.src = image;
    div.appendChild(img);
  }
  const span = document.createElement("span");
  span.className = "text";
  span.textContent = text;
  div.appendChild(span);
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function setBusy(busy, text) {
  $("send").disabled = busy;
  $("stop").hidden = !busy;
  $("status").dataset.state = busy ? "busy" : "idle";
  $("status").textContent = text;
}

async function send(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text && !state.image) return;
  const content = [];
  if (state.image) content.push({ type: "image_url", image_url: { url: state.image } });
  content.push({ type: "text", text });
  const turn = { role: "user", content };
  show("user", text, state.image);
  $("prompt").value = "";
  clearImage();

  if (!state.model) await loadModel();
  const answer = show("assistant", "");
  answer.dataset.chunks = "0";
  state.controller = new AbortController();
  setBusy(true, "answering…");
  try {
    const reply = await streamAnswer([...state.history, turn], answer);
    state.history.push(turn, { role: "assistant", content: reply });
    setBusy(false, "");
  } catch (err) {
    answer.remove();
    if (err.name !== "AbortError") show("error", err.message);
    setBusy(false, err.name === "AbortError" ? "stopped" : "");
  }
}

async function streamAnswer(messages, answer) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: headers(),
    body: JSON.stringify({ model: state.model, messages, stream: true }),
    signal: state.controller.signal,
  });
  if (!response.ok) throw new Error(await errorMessage(response));
  const textNode = answer.querySelector(".text");
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return textNode.textContent;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const data = buffer.slice(0, end).replace(/^data: ?/, "");
      buffer = buffer.slice(end + 2);
      if (data === "[DONE]") return textNode.textContent;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const piece = chunk.choices.length ? chunk.choices[0].delta.content : null;
      if (piece) {
        textNode.textContent += piece;
        answer.dataset.chunks = String(Number(answer.dataset.chunks) + 1);
        answer.scrollIntoView({ block: "end" });
      }
    }
  }
}

$("composer").addEventListener("submit", send);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key !== "Enter" || e.shiftKey) return;
  e.preventDefault();
  $("composer").requestSubmit();
});
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("new-chat").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.history = [];
  $("messages").replaceChildren();
  clearImage();
  setBusy(false, "");
});

loadModel();
