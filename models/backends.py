"""The backend a model config names: `load_chat_model`.

Apart from `esvr.models.chat` so that the backends, which subclass its `ChatModel`, are imported
only by the one function that picks among them.
"""

from __future__ import annotations

from esvr.models.chat import CachedChatModel, ChatModel, ResponseCache
from esvr.models.config import ModelConfig


def load_chat_model(spec: ModelConfig | str, cache: ResponseCache | None = None) -> ChatModel:
    """Build the backend a spec names, wrapped in the response cache when one is given."""
    if isinstance(spec, str):
        spec = ModelConfig(spec=spec)
    model: ChatModel
    if spec.backend == "openai":
        from esvr.models.openai_backend import OpenAIChat

        model = OpenAIChat.from_spec(spec)
    else:
        from esvr.models.hf_backend import HFChat

        model = HFChat.from_spec(spec)
    return CachedChatModel(model, cache) if cache is not None else model
