"""How the fault-injection clients judge an answer (gateway.dev.faults): a full answer, a clean OpenAI-shaped error,
or anything else (a torn stream, an error in another shape)."""

from __future__ import annotations

import json

from gateway.dev.faults import Outcome, PhaseResult, Result, classify_json, classify_stream, error_message, missing

_ERROR = {"error": {"message": "The engine stream was interrupted.", "type": "server_error", "param": None,
                    "code": "engine_unavailable"}}


def _chunk(text: str, *, finish: str | None = None, tokens: tuple[int, int] = (5, 1)) -> str:
    return json.dumps({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}],
                       "usage": {"prompt_tokens": tokens[0], "completion_tokens": tokens[1]}})


def test_a_json_answer_and_an_openai_error_are_told_apart_from_other_bodies() -> None:
    answer = json.dumps({"choices": [{"text": "hi"}], "usage": {"prompt_tokens": 3, "completion_tokens": 2}})
    assert classify_json(200, answer.encode()) == (Result.ANSWERED, "200", 5)
    assert classify_json(503, json.dumps(_ERROR).encode()) == (Result.CLEAN_ERROR, "503 engine_unavailable", 0)
    assert classify_json(502, b"<html>Bad Gateway</html>")[0] is Result.OTHER
    assert classify_json(500, json.dumps({"detail": "Internal Server Error"}).encode())[0] is Result.OTHER
    assert classify_json(200, b'{"choices": []}')[0] is Result.OTHER  # no usage


def test_a_stream_is_answered_only_when_it_finishes_and_ends_with_done() -> None:
    full = [_chunk("a", tokens=(5, 1)), _chunk("b", finish="length", tokens=(5, 2)), "[DONE]"]
    assert classify_stream(full) == (Result.ANSWERED, "200 stream", 7)
    assert classify_stream(full[:-1])[0] is Result.OTHER  # torn: no [DONE]
    assert classify_stream([_chunk("a"), "[DONE]"])[0] is Result.OTHER  # [DONE] without a finished choice
    broken = classify_stream(full[:1], broken="RemoteProtocolError")
    assert broken[0] is Result.OTHER and "RemoteProtocolError" in broken[1]


def test_a_stream_that_fails_cleanly_ends_with_an_error_event_then_done() -> None:
    cut = [_chunk("a", tokens=(5, 1)), json.dumps(_ERROR), "[DONE]"]
    assert classify_stream(cut) == (Result.CLEAN_ERROR, "stream error event engine_unavailable", 6)
    assert classify_stream(cut[:-1])[0] is Result.OTHER  # the error event without [DONE]
    assert classify_stream([json.dumps(_ERROR), _chunk("b", finish="stop"), "[DONE]"])[0] is Result.OTHER
    assert classify_stream([_chunk("a"), json.dumps({"error": "boom"}), "[DONE]"])[0] is Result.OTHER


def test_missing_lists_what_was_stored_before_and_is_not_the_same_after() -> None:
    before = {"t": {"keys": ["k1", "k2"], "adapters": {"a": {"active": 2}}, "documents": {"d1": 3}}}
    grown = {"t": {"keys": ["k1", "k2", "k3"], "adapters": {"a": {"active": 2}, "b": {}}, "documents": {"d1": 3}},
             "u": {}}
    assert missing(before, grown) == []
    shrunk = {"t": {"keys": ["k2"], "adapters": {"a": {"active": 1}}, "documents": {}}}
    assert missing(before, shrunk) == ["/t/keys: 'k1' is gone", "/t/adapters/a/active: 2 became 1",
                                       "/t/documents/d1 is gone"]


def test_a_phase_keeps_the_messages_of_its_error_answers_a_few_per_kind() -> None:
    assert error_message(json.dumps(_ERROR).encode()) == "The engine stream was interrupted."
    assert error_message(b"<html>Bad Gateway</html>") == ""

    def outcome(detail: str, message: str) -> Outcome:
        return Outcome(kind="json", result=Result.CLEAN_ERROR, detail=detail, started=0.0, ended=1.0,
                       message=message)

    database = "The gateway's database is unavailable; try again shortly."
    outcomes = [outcome("503 dependency_unavailable", database), outcome("503 dependency_unavailable", database),
                *(outcome("503 engine_unavailable", f"engine down ({i})") for i in range(5)),
                Outcome(kind="json", result=Result.ANSWERED, detail="200", started=0.0, ended=1.0)]
    result = PhaseResult(fault="f", outcomes=outcomes, recovery_s=None, tokens_seen=0, tokens_recorded=0)
    assert result.error_messages() == {"503 dependency_unavailable": [database],
                                       "503 engine_unavailable": ["engine down (0)", "engine down (1)",
                                                                  "engine down (2)"]}
    assert result.row()["error_messages"] == result.error_messages()
