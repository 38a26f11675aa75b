"""Admin console statement splitting; Patroni API credentials kept out of logged errors."""

from __future__ import annotations

import asyncio

import pytest

from pg_doorman.admin.console import split_statements
from pg_doorman.net.patroni_api import PatroniApiError, fetch_cluster


def test_a_failed_api_request_does_not_repeat_the_urls_password() -> None:
    async def main() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()  # nothing listens there now: the connection is refused
        with pytest.raises(PatroniApiError) as caught:
            await fetch_cluster([f"http://ops:s3cret@127.0.0.1:{port}/"], 1.0)
        message = str(caught.value)
        assert f"http://ops:********@127.0.0.1:{port}/: " in message
        assert "s3cret" not in message

    asyncio.run(main())


def test_a_url_refused_as_not_http_does_not_repeat_its_password() -> None:
    async def main() -> None:
        with pytest.raises(PatroniApiError) as caught:
            await fetch_cluster(["ftp://ops:s3cret@127.0.0.1:1/"], 1.0)
        assert "s3cret" not in str(caught.value) and "ops:********@" in str(caught.value)

    asyncio.run(main())


@pytest.mark.parametrize(
    ("text", "statements"),
    [
        ("-- it's a note\nSHOW VERSION", ["SHOW VERSION"]),
        ("/* it's; */ SHOW POOLS; SHOW USERS -- ; SHOW STATS", ["SHOW POOLS", "SHOW USERS"]),
        ("/* outer /* inner */ still */ SHOW LISTS", ["SHOW LISTS"]),
        ("SET application_name = '-- /* ; */'", ["SET application_name = '-- /* ; */'"]),
        ("SET application_name = 'it''s'; RELOAD", ["SET application_name = 'it''s'", "RELOAD"]),
        ("SHOW VERSION /* never closed ; RELOAD", ["SHOW VERSION"]),
        ("-- only a comment", []),
    ],
)
def test_statements_are_split_outside_quotes_and_comments(text: str, statements: list[str]) -> None:
    assert split_statements(text) == statements
