"""``dylora serve``: an OpenAI-compatible HTTP server with continuous batching (docs/serving.md)."""
