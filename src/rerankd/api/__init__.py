"""The HTTP server: `create_app(reranker, options, model_name)`; `rerankd serve` runs it with uvicorn."""

from .app import create_app

__all__ = ["create_app"]
