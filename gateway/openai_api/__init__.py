"""The tenant-facing OpenAI-compatible surface: models, chat completions, completions."""
