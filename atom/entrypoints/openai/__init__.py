"""OpenAI-compatible HTTP front end: `python -m atom.entrypoints.openai_server`."""
