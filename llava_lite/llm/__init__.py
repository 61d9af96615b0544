"""The package's LLM client, shared by datagen, the judges and the scorers.

- `chat`: what every backend takes and gives (`ChatRequest`, `ChatReply`, the `Backend` protocol) and the named
  reasons a request fails or a reply is refused;
- `backends`: the backends there are and `build_backend`, the one place one is built from its settings;
- `openai`: any OpenAI-compatible server over HTTP, with retries, a deadline per attempt and per request, and
  every malformed reply a named failure; `deadline` holds the socket-level deadline httpx lacks;
- `hf`: a local transformers model, batched;
- `journal`: the append-only file a long run of requests resumes from.
"""
