"""pyllama-mtp-server: an OpenAI-compatible HTTP server over one Llama (see cli.py)."""
