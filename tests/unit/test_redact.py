"""The one URL redaction: every form of credential in a URL is masked, wherever a URL is shown."""

from __future__ import annotations

import pytest

from mcpq.worker.config import MCPServerConfig
from mcpq.worker.contract.redact import MASK, redact_args, redact_url, redact_urls_in
from mcpq.worker.contract.settings import Settings

pytestmark = pytest.mark.timeout(10)

SECRET = "s3cr3t-Value"

#: (url holding SECRET, what it must show)
FORMS = [
    (f"redis://{SECRET}@h:6379/0", "redis://***@h:6379/0"),  # token as the user name
    (f"redis://:{SECRET}@h/0", "redis://:***@h/0"),
    (f"redis://user:{SECRET}@h/0", "redis://user:***@h/0"),
    (f"rediss://user:{SECRET}@x@h:6380/1", "rediss://user:***@h:6380/1"),  # '@' inside the password
    (f"amqp://guest:{SECRET}#frag@h:5672//", "amqp://guest:***@h:5672//"),  # '#' inside the password
    (f"redis://h:6379/0?password={SECRET}", "redis://h:6379/0?password=***"),
    (f"redis://h/0?db=1&password={SECRET}&x=y", "redis://h/0?db=1&password=***&x=y"),
    (f"https://api.example/mcp?api_key={SECRET}", "https://api.example/mcp?api_key=***"),
    (f"https://api.example/mcp?access_token={SECRET}#top", "https://api.example/mcp?access_token=***#top"),
    (f"http://h/sse?auth={SECRET}", "http://h/sse?auth=***"),
    (f"http://h/sse?sig={SECRET}", "http://h/sse?sig=***"),
    (f"http://h/?pwd={SECRET}", "http://h/?pwd=***"),
    (
        f"sentinel://:{SECRET}@a:26379;sentinel://:{SECRET}@b:26379",
        "sentinel://:***@a:26379;sentinel://:***@b:26379",
    ),
]


@pytest.mark.parametrize(("url", "shown"), FORMS)
def test_every_credential_form_is_masked(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert SECRET not in redact_url(url)


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "http://h:8080/mcp?page=2", "memory://"])
def test_urls_without_credentials_are_unchanged(url: str) -> None:
    assert redact_url(url) == url


def test_text_without_a_scheme_but_with_credentials_is_masked_whole() -> None:
    assert redact_url(f"user:{SECRET}@host") == MASK


def test_urls_inside_messages_are_redacted() -> None:
    text = (
        f"Error 111 connecting to redis://u:{SECRET}@h:6379/0. Connection refused; also 'amqp://{SECRET}@q//'"
    )
    out = redact_urls_in(text)
    assert SECRET not in out
    assert "redis://u:***@h:6379/0." in out and "'amqp://***@q//'" in out


def test_settings_show_urls_through_the_one_redaction() -> None:
    settings = Settings(
        broker_url=f"redis://{SECRET}@h/0",
        result_backend=f"rediss://user:{SECRET}@h/1",
        redis_url=f"redis://user:{SECRET}@h/2",
        admin_token=SECRET,
    )
    shown = settings.redacted()
    assert SECRET not in repr(shown)
    assert shown["broker_url"] == "redis://***@h/0"
    assert shown["result_backend"] == "rediss://user:***@h/1"
    assert shown["admin_token"] == "set"


def test_server_config_publishes_urls_and_args_redacted() -> None:
    http = MCPServerConfig(name="a", url=f"https://{SECRET}@api.example/mcp?token={SECRET}")
    assert SECRET not in http.model_dump_json()
    assert SECRET not in repr(http)
    stdio = MCPServerConfig(name="b", command="srv", args=["--token", SECRET, f"--url=redis://:{SECRET}@h"])
    assert SECRET not in repr(stdio.summary())


def test_redact_args_forms() -> None:
    assert redact_args(["--token", SECRET, f"API_KEY={SECRET}", f"redis://:{SECRET}@h", "plain"]) == [
        "--token",
        MASK,
        f"API_KEY={MASK}",
        f"redis://:{MASK}@h",
        "plain",
    ]
