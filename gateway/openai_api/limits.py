"""What one completion request may ask of the shared engine, and the most tokens it can cost.

Caps are checked before admission (a refused request takes no slot): prompts per request, ``n`` and
``best_of``, ``max_tokens`` (``BANYAN_MAX_PROMPTS_PER_REQUEST``, ``BANYAN_MAX_N``,
``BANYAN_MAX_TOKENS_PER_REQUEST``); over one, ``400 invalid_request_error`` with ``param``. The worst case
(:func:`worst_case_tokens` of :func:`prompt_sizes`) is reserved against the tenant's ``tpm`` at admission and
the difference given back once the real usage is known (:mod:`gateway.quotas`).
"""

from __future__ import annotations

from typing import Any

from gateway.errors import InvalidRequest
from gateway.openai_api.protocol import CompletionRequest, GenerationRequest
from gateway.settings import Settings
from retrieval.context import TokenCounter

COMPLETIONS_DEFAULT_MAX_TOKENS = 16
"""What OpenAI (and vLLM) generate for a completion request that sets no ``max_tokens``."""


def check_caps(request: GenerationRequest, settings: Settings) -> None:
    prompts = request.prompt_count()
    if prompts > settings.max_prompts_per_request:
        raise InvalidRequest(f"At most {settings.max_prompts_per_request} prompts per request; got {prompts}.",
                             param="prompt")
    for param, value in (("n", request.n), ("best_of", request.best_of)):
        if value is not None and value > settings.max_n:
            raise InvalidRequest(f"`{param}` may be at most {settings.max_n}; got {value}.", param=param)
    output, cap = request.output_tokens(), output_cap(settings)
    if output is not None and output > cap:
        raise InvalidRequest(f"`{request.output_param()}` may be at most {cap}; got {output}.",
                             param=request.output_param())


def output_cap(settings: Settings) -> int:
    """The most tokens one choice may generate."""
    cap = settings.max_tokens_per_request
    return settings.max_model_len if cap is None else min(cap, settings.max_model_len)


def apply_output_cap(request: GenerationRequest, body: dict[str, Any], settings: Settings) -> None:
    """A chat request that sets no output limit would run to the end of the window: below the window, the cap
    becomes its ``max_tokens``."""
    if request.output_tokens() is None and output_cap(settings) < settings.max_model_len:
        body["max_tokens"] = output_cap(settings)


def worst_case_tokens(request: GenerationRequest, body: dict[str, Any], *, prompt_sizes: list[int],
                      settings: Settings) -> int:
    """The most prompt + completion tokens the request can cost: each prompt (its size from :func:`prompt_sizes`;
    with ``rag``, plus the largest context), plus every choice generating all it may, within the window."""
    window = settings.max_model_len
    extra = settings.rag_max_context_tokens if request.rag_options() is not None else 0
    output = body.get("max_completion_tokens") or body.get("max_tokens")
    if output is None and isinstance(request, CompletionRequest):
        output = COMPLETIONS_DEFAULT_MAX_TOKENS
    total = 0
    for prompt in prompt_sizes:
        prompt = min(window, prompt + extra)
        per_choice = window - prompt if output is None else min(int(output), window - prompt)
        total += prompt + request.choices_per_prompt() * max(0, per_choice)
    return total


def prompt_sizes(request: GenerationRequest, body: dict[str, Any], tokens: TokenCounter) -> list[int]:
    """About how many tokens each prompt of the request takes (a chat: its messages; a completion: each prompt;
    one string as its surface counts it, template included). Counts text with ``tokens``: call it off the event
    loop. Counted once per request: admission and the ``rag`` budget both use it."""
    prompt = request.prompt if isinstance(request, CompletionRequest) else None
    if prompt is None or isinstance(prompt, str):
        return [request.surface.grounder.prompt_tokens(body, tokens)]
    if not prompt or isinstance(prompt[0], int):
        return [len(prompt)]
    return [tokens.count(p) if isinstance(p, str) else len(p) for p in prompt]
