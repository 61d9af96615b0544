"""Serving a trained model: an OpenAI-compatible chat-completions API and a chat page, over one bounded queue."""
