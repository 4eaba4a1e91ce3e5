"""The HTTP server: `create_app(reranker, options, model_name)`, or `load_app(model, ...)` which loads the model first;
`rerankd serve` runs it with uvicorn, `rerankd serve --ray` on Ray Serve (api/ray_serve.py)."""

from .app import create_app, load_app

__all__ = ["create_app", "load_app"]
