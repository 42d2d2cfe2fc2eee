"""Wire models of the OpenAI-compatible routes. No I/O here.

Only the fields the gateway acts on are typed. What reaches the engine is an allowlist per surface: the
OpenAI request fields vLLM acts on, plus vLLM's documented sampling parameters. OpenAI fields vLLM would
ignore anyway (``store``, ``metadata``, ...) are accepted and dropped; anything else is refused with
``400 invalid_request_error`` naming the field, as OpenAI refuses an unrecognized request argument. So a
tenant can never reach the engine's own controls (``request_id``, ``cache_salt``, ``priority``,
``chat_template``, ``kv_transfer_params``, ``vllm_xargs``, ``prompt_embeds``, ...): they are simply unknown.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway.errors import InvalidRequest
from gateway.openai_api.surfaces import CHAT, COMPLETIONS, Surface

_SHARED_FIELDS = frozenset({
    # OpenAI
    "model", "stream", "stream_options", "max_tokens", "n", "temperature", "top_p", "stop", "seed",
    "frequency_penalty", "presence_penalty", "logit_bias", "logprobs", "user", "response_format", "echo",
    # vLLM sampling parameters (docs: "Extra Parameters" of the OpenAI-compatible server)
    "use_beam_search", "top_k", "min_p", "repetition_penalty", "length_penalty", "stop_token_ids",
    "include_stop_str_in_output", "ignore_eos", "min_tokens", "skip_special_tokens",
    "spaces_between_special_tokens", "truncate_prompt_tokens", "allowed_token_ids", "prompt_logprobs",
    "bad_words", "structured_outputs", "add_special_tokens", "return_tokens_as_token_ids",
})
CHAT_FIELDS = _SHARED_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                                "parallel_tool_calls", "reasoning_effort", "add_generation_prompt",
                                "continue_final_message"}
"""What a chat request may pass on to the engine."""
COMPLETION_FIELDS = _SHARED_FIELDS | {"prompt", "suffix"}
"""What a completion request may pass on to the engine."""
DROPPED_FIELDS = frozenset({"store", "metadata", "service_tier", "prompt_cache_key", "safety_identifier",
                            "best_of"})
"""OpenAI fields accepted and not passed on: vLLM does nothing with them (``best_of`` is checked against the
``n`` cap first; vLLM 0.32 has no ``best_of``)."""
GATEWAY_FIELDS = frozenset({"rag"})
"""The gateway's own extensions, acted on here and never passed on."""


class RagOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    top_k: int = Field(default=4, ge=1, le=20)
    collection: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    surface: ClassVar[Surface]
    forwarded: ClassVar[frozenset[str]]
    model: str = Field(min_length=1, max_length=256)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    n: int | None = None
    best_of: int | None = None
    rag: RagOptions | bool = False

    def unrecognized(self) -> str | None:
        """The first field the request may not carry (neither passed on, dropped nor the gateway's), if any."""
        known = self.forwarded | DROPPED_FIELDS | GATEWAY_FIELDS
        return next((name for name in self.model_extra or {} if name not in known), None)

    def engine_body(self) -> dict[str, Any]:
        """The body for the engine (the allowlisted fields), before the gateway sets ``model``, ``cache_salt``
        and ``stream_options``; :class:`InvalidRequest` for a field the request may not carry."""
        field = self.unrecognized()
        if field is not None:
            raise InvalidRequest(f"Unrecognized request argument supplied: `{field}`.", param=field)
        body = self.model_dump(exclude_none=True)
        return {name: value for name, value in body.items() if name in self.forwarded and name != "stream_options"}

    def rag_options(self) -> RagOptions | None:
        if self.rag is False:
            return None
        return RagOptions() if self.rag is True else self.rag

    def output_tokens(self) -> int | None:
        """The most tokens the request asks the model to generate per choice, if it says."""
        return self.max_tokens

    def output_param(self) -> str:
        """The field that sets :meth:`output_tokens` (for errors)."""
        return "max_tokens"

    def choices_per_prompt(self) -> int:
        """Sequences the engine generates for each prompt."""
        return max(self.n or 1, self.best_of or 1)

    def prompt_count(self) -> int:
        return 1


class ChatCompletionRequest(GenerationRequest):
    surface = CHAT
    forwarded = CHAT_FIELDS
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = None

    def output_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def output_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens else "max_tokens"


class CompletionRequest(GenerationRequest):
    surface = COMPLETIONS
    forwarded = COMPLETION_FIELDS
    prompt: str | list[str] | list[int] | list[list[int]]

    def prompt_count(self) -> int:
        """A string or one list of token ids is one prompt; a list of strings or of token lists is many."""
        if isinstance(self.prompt, list) and self.prompt and not isinstance(self.prompt[0], int):
            return len(self.prompt)
        return 1


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


class EmbeddingRequest(BaseModel):
    """``POST /v1/embeddings`` (OpenAI's shape). Token-id inputs parse, so that the service can refuse them by
    name rather than as a type error; any field not typed here is refused by the service, naming it."""

    model_config = ConfigDict(extra="allow")
    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = Field(default=None, max_length=256)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None

    def unrecognized(self) -> str | None:
        return next(iter(self.model_extra or {}), None)
