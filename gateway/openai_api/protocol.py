"""Wire models of the OpenAI-compatible routes. Only the fields the gateway acts on are typed; every
other OpenAI (and vLLM sampling) field passes through to the engine unchanged. No I/O here."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from gateway.openai_api.surfaces import CHAT, COMPLETIONS, Surface

ENGINE_ONLY_FIELDS = frozenset({"cache_salt", "kv_transfer_params", "vllm_xargs", "chat_template",
                                "lora_request", "priority"})
"""vLLM extensions a tenant may not set: the gateway owns cache isolation, templates and scheduling."""


class RagOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    top_k: int = Field(default=4, ge=1, le=20)
    collection: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = None


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    surface: ClassVar[Surface]
    model: str = Field(min_length=1, max_length=256)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    rag: RagOptions | bool = False

    def engine_body(self) -> dict[str, Any]:
        """The body for the engine, before the gateway sets ``model`` and ``cache_salt``."""
        return self.model_dump(exclude={"rag"}, exclude_none=True)

    def rag_options(self) -> RagOptions | None:
        if self.rag is False:
            return None
        return RagOptions() if self.rag is True else self.rag

    def output_tokens(self) -> int | None:
        """The most tokens the request asks the model to generate, if it says."""
        return self.max_tokens


class ChatCompletionRequest(GenerationRequest):
    surface = CHAT
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = None

    def output_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(GenerationRequest):
    surface = COMPLETIONS
    prompt: str | list[str] | list[int] | list[list[int]]


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str
    parent: str | None = None
    root: str | None = None


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]
