"""No secret in any exception the SDK raises, its cause and context chain, reprs, tracebacks
or log lines, against servers that echo the request's headers back into their answers."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import kling_async as ka
from tests.hostile import GarbageHTTPServer, HostileServer, texts_of

pytestmark = pytest.mark.anyio

KEY = "sk-canary-2f7d1c9e4b6a8053"
ACCESS = "ak-canary-71c3e9"
SECRET = "secret-canary-9d2b4f6e8a0c1357-0123456789abcdef"


CREDENTIALS: list[dict[str, str]] = [
    {"api_key": KEY},
    {"access_key": ACCESS, "secret_key": SECRET},
]


@pytest.mark.parametrize("credentials", CREDENTIALS, ids=["bearer", "jwt"])
@pytest.mark.parametrize(
    "mode",
    ["kling_400", "kling_401", "html_500", "cometapi_500", "not_a_task", "failed_task", "garbage"],
)
async def test_echoed_credentials_never_reach_an_exception_chain_or_a_log(
    credentials: dict[str, str], mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="kling_async")
    raised: list[BaseException] = []
    async with HostileServer() as hostile, GarbageHTTPServer() as garbage:
        hostile.api_mode = "kling_400" if mode == "garbage" else mode  # type: ignore[assignment]
        base_url = garbage.url if mode == "garbage" else hostile.url
        async with ka.KlingClient(
            base_url=base_url,
            retry=ka.RetryPolicy(attempts=2, timeout=1, initial=0.01, maximum=0.02),
            timeout=2.0,
            settle_window=0.05,
            **credentials,  # type: ignore[arg-type]
        ) as kling:
            token = kling._auth.header().removeprefix("Bearer ")
            calls: list[Callable[[], Awaitable[Any]]] = [
                lambda: (
                    kling.text2video.wait("123", timeout=1)
                    if mode == "failed_task"
                    else kling.text2video.get("123")
                ),
                lambda: kling.text2video.get(external_task_id="job-1"),
                lambda: kling.text2video.create(ka.Text2VideoRequest(prompt="p")),
                lambda: kling.text2video.list(),
            ]
            for call in calls:
                try:
                    await call()
                except ka.KlingError as exc:
                    raised.append(exc)
            job = kling.submit(ka.Text2VideoRequest(prompt="q"))
            try:
                await job.wait()
            except ka.KlingError as exc:
                raised.append(exc)
            if mode == "failed_task":
                tracked = kling.track("456")
                try:
                    await tracked.wait()
                except ka.TaskFailedError as exc:
                    raised.append(exc)
        reached = garbage.connections if mode == "garbage" else hostile.hits["api"]
    assert reached > 0, "the hostile server was never asked"
    # Against a failed task the waits and the external-id lookup raise; create and list pass.
    assert len(raised) == (4 if mode == "failed_task" else 5)
    if mode == "failed_task":
        assert any(isinstance(exc, ka.TaskFailedError) for exc in raised)
    secrets = [*credentials.values(), token]
    texts = [text for exc in raised for text in texts_of(exc)]
    texts += [record.getMessage() for record in caplog.records]
    texts += [str(record.exc_info) for record in caplog.records if record.exc_info]
    for secret in secrets:
        for text in texts:
            assert secret not in text
    # What the server echoed is still visible, with the secret cut out.
    if mode in ("kling_400", "kling_401", "failed_task"):
        assert any("Bearer ***" in text for text in texts)


def test_the_redactor_cleans_known_secrets_and_any_bearer_token() -> None:
    from kling_async._errors import Redactor

    secrets = ["sk-one-two-three"]
    redact = Redactor(lambda: secrets)
    assert redact("x sk-one-two-three y") == "x *** y"
    assert redact("Authorization: Bearer eyJabc.def-ghi_jk") == "Authorization: Bearer ***"
    secrets.append("fresh-token-1234")
    assert redact("got fresh-token-1234") == "got ***"
    assert redact("abc") == "abc"


SECRETS = ("sk-canary-echoed-4c1d", "eyJhbGciOiJIUzI1NiJ9.e30.canarysig")
_leafs = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.sampled_from([*SECRETS, f"Bearer {SECRETS[0]}", f"token={SECRETS[1]};"]),
)
_json = st.recursive(
    _leafs,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


def _no_secret(value: Any) -> bool:
    return not any(secret in repr(value) for secret in SECRETS)


_echoes = st.sampled_from([*SECRETS, f"Bearer {SECRETS[0]}", f"x {SECRETS[1]} y"])
_task_shaped = st.fixed_dictionaries(
    # The task id is an identifier the client keeps verbatim (it is sent back on every poll),
    # never a place a secret is redacted from; every other field may carry one.
    {
        "task_id": st.text(min_size=1, max_size=8) | _json.filter(_no_secret),
        "task_status_msg": _echoes | _json,
    },
    optional={
        "task_status": st.sampled_from(["submitted", "processing", "succeed", "failed"]) | _json,
        "task_info": _json,
        "task_result": _json,
        "created_at": _json,
        "updated_at": _json,
        "final_unit_deduction": _json,
    },
)


@given(_task_shaped)
def test_task_shaped_bodies_become_tasks_or_typed_errors_with_no_secret(body: Any) -> None:
    """Callback-shaped and query-shaped task objects from a hostile server, secrets planted
    anywhere: a Task whose failure reason is clean, or a ResponseDecodeError that is."""
    from kling_async._errors import Redactor
    from kling_async.protocol.converter import structure_task

    redact = Redactor(lambda: SECRETS)
    try:
        task = structure_task(body, redact=redact)
    except ka.ResponseDecodeError as exc:
        texts = texts_of(exc)
    else:
        texts = [task.status_message, str(ka.TaskFailedError(task))]
    for secret in SECRETS:
        assert all(secret not in text for text in texts)


@given(st.integers(100, 599), _json)
def test_error_envelopes_never_carry_an_echoed_secret(status: int, body: Any) -> None:
    import json

    from kling_async._errors import Redactor
    from kling_async.protocol.converter import decode_envelope

    redact = Redactor(lambda: SECRETS)
    raw = json.dumps({"code": 1201, "message": body, "request_id": body, "error": body}).encode()
    try:
        decode_envelope(status, raw, redact=redact)
    except ka.KlingError as exc:
        for secret in SECRETS:
            assert all(secret not in text for text in texts_of(exc))
