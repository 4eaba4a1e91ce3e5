"""rerankd: a reranking engine and server for Jina's rerankers and Hugging Face cross-encoders."""

from .errors import InputError, ModelLoadError, PairErrors, RerankdError
from .reranker import Reranker

__version__ = "0.1.0"
__all__ = ["InputError", "ModelLoadError", "PairErrors", "Reranker", "RerankdError", "__version__"]
