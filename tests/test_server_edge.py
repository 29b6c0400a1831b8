"""The server's edge, over real sockets: whose forwarded headers are believed."""

from __future__ import annotations

import pytest

from gateway.settings import ServerSettings
from tests.conftest import ADMIN_KEY, make_settings, serve_gateway

FORGED = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"}


async def _sign_in(gw, **headers: str):
    signed = await gw.post("/admin/api/session", json={"key": ADMIN_KEY}, headers=headers)
    assert signed.status_code == 200, signed.text
    audit = (await gw.get("/admin/api/audit", headers={"Authorization": f"Bearer {ADMIN_KEY}"})).json()["audit"]
    return signed.headers["set-cookie"], audit[0]["ip"]


async def _guesses_are_throttled_together(gw) -> bool:
    """Eleven wrong admin keys, each claiming another client address: is the eleventh throttled?"""
    for i in range(10):
        wrong = await gw.post("/admin/api/session", json={"key": "guess"}, headers={"X-Forwarded-For": f"198.51.100.{i}"})
        assert wrong.status_code == 401
    last = await gw.post("/admin/api/session", json={"key": "guess"}, headers={"X-Forwarded-For": "198.51.100.99"})
    return last.status_code == 429


async def test_forwarded_headers_are_ignored_by_default_even_with_forwarded_allow_ips(
        redis_url, prefix, sandbox, monkeypatch: pytest.MonkeyPatch):
    # uvicorn reads FORWARDED_ALLOW_IPS when it is given no list: the gateway always gives one
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "*")
    async with serve_gateway(make_settings(redis_url, prefix, sandbox.url)) as gw:
        cookie, ip = await _sign_in(gw, **FORGED)
        assert ip == "127.0.0.1" and "Secure" not in cookie  # the connection's address and scheme
        assert await _guesses_are_throttled_together(gw)  # a guesser cannot pose as many addresses


async def test_forwarded_headers_are_believed_from_a_trusted_proxy(redis_url, prefix, sandbox):
    settings = make_settings(redis_url, prefix, sandbox.url, server=ServerSettings(trusted_proxies=("127.0.0.1",)))
    async with serve_gateway(settings) as gw:
        cookie, ip = await _sign_in(gw, **FORGED)
        assert ip == "203.0.113.9" and "Secure" in cookie
        assert not await _guesses_are_throttled_together(gw)  # each client behind the proxy has its own allowance


@pytest.mark.parametrize("value", ["*", "localhost", "10.0.0.1/8", "300.1.2.3"])
def test_trusted_proxies_are_addresses_or_networks(tmp_path, value: str):
    import shutil

    from gateway.settings import ConfigError, load_file_settings
    from tests.conftest import CONFIG

    config = tmp_path / "config"
    shutil.copytree(CONFIG, config)
    toml = config / "gateway.toml"
    toml.write_text(toml.read_text() + f'\n[server]\ntrusted_proxies = ["::1", "10.0.0.0/8", "{value}"]\n')
    with pytest.raises(ConfigError, match=r"\$\.server\.trusted_proxies\[2\]: not an IP address or CIDR network"):
        load_file_settings(config)
