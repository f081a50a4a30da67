"""Model clients behind the `LLM` and `Embedder` interfaces (pipelines/clients/base.py)."""
