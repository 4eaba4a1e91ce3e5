"""The HTTP server: `create_app(reranker, options, model_name)`, or `load_app(model, ...)` which loads the model first;
`rerankd serve` runs it with uvicorn, `rerankd serve --ray` on Ray Serve (api/ray_serve.py). Both are imported on
first use (PEP 562): Ray's proxy imports api/ray_proxy.py alone, without torch."""

__all__ = ["create_app", "load_app"]


def __getattr__(name: str):
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module 'rerankd.api' has no attribute {name!r}")
