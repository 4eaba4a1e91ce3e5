"""rerankd: a reranking engine and server for Jina's rerankers and Hugging Face cross-encoders.

`Reranker` is imported on first use (PEP 562), so that the light parts of the package (the HTTP error shape that
Ray's proxy imports, the options) load without torch."""

from .errors import InputError, ModelLoadError, PairErrors, RerankdError

__version__ = "0.1.0"
__all__ = ["InputError", "ModelLoadError", "PairErrors", "Reranker", "RerankdError", "__version__"]


def __getattr__(name: str):
    if name == "Reranker":
        from .reranker import Reranker

        return Reranker
    raise AttributeError(f"module 'rerankd' has no attribute {name!r}")
