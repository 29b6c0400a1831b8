"""Mutual TLS per source: a source with `client_cert_names` is reached only with a client
certificate that the gateway's client CA signed and that names the source, on top of its key.
Other sources on the same port keep calling with keys alone."""

from __future__ import annotations

import shutil
import ssl
from pathlib import Path

import httpx
import msgspec
import pytest

from gateway.settings import ConfigError, TlsSettings, load_file_settings
from tests.certs import CA
from tests.conftest import ROOT, VIDEO_VISIT, auth, corpus, make_settings, serve_gateway


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pki")
    ca, stranger_ca = CA(), CA("another CA")
    files = {"ca": ca.write(folder / "clients-ca.crt")}
    files["server"], files["server_key"] = ca.issue(folder, "gateway", common_name="127.0.0.1", ip="127.0.0.1")
    files["cerner"], files["cerner_key"] = ca.issue(folder, "cerner", common_name="Cerner interface",
                                                    dns=("cerner-interface.example.org",), client=True)
    files["epic"], files["epic_key"] = ca.issue(folder, "epic", common_name="epic-interface.example.org", client=True)
    files["forged"], files["forged_key"] = stranger_ca.issue(folder, "forged", common_name="Cerner interface",
                                                             dns=("cerner-interface.example.org",), client=True)
    return files


def client_tls(pki: dict[str, Path], who: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki["ca"]))
    if who:
        context.load_cert_chain(pki[who], pki[f"{who}_key"])
    return context


def mtls_settings(redis_url: str, prefix: str, sandbox_url: str, pki: dict[str, Path]):
    settings = make_settings(redis_url, prefix, sandbox_url, tls=TlsSettings(
        certificate_file=str(pki["server"]), key_file=str(pki["server_key"]), client_ca_file=str(pki["ca"])))
    sources = dict(settings.file.sources)
    sources["cerner"] = msgspec.structs.replace(sources["cerner"], client_cert_names=("cerner-interface.example.org",))
    return msgspec.structs.replace(settings, file=msgspec.structs.replace(settings.file, sources=sources))


async def book(client: httpx.AsyncClient, source: str, body: bytes) -> httpx.Response:
    return await client.post(f"/fhir/{source}/Appointment/$translate", content=body,
                             headers=auth(source, **{"Content-Type": "application/fhir+json"}))


async def test_a_source_that_wants_mutual_tls_gets_it(redis_url, prefix, sandbox, pki):
    settings = mtls_settings(redis_url, prefix, sandbox.url, pki)
    cerner_body = corpus(VIDEO_VISIT)
    epic_body = b"{"  # refused 400 by the adapter: proof that the call got past authentication
    async with serve_gateway(settings, client_tls=client_tls(pki, "cerner")) as with_cert:
        assert str(with_cert.base_url).startswith("https://")
        r = await with_cert.post("/fhir/cerner/Appointment", content=cerner_body,
                                 headers=auth(**{"Content-Type": "application/fhir+json"}))
        assert r.status_code == 201, r.text
        # the certificate does not stand in for the key: both are needed
        r = await with_cert.post("/fhir/cerner/Appointment/$translate", content=cerner_body,
                                 headers={"Content-Type": "application/fhir+json"})
        assert r.status_code == 401

    async with serve_gateway(settings, client_tls=client_tls(pki, None)) as no_cert:
        r = await book(no_cert, "cerner", cerner_body)
        assert r.status_code == 401 and r.json()["resourceType"] == "OperationOutcome"
        assert r.json()["issue"][0]["details"]["text"] == "this source calls with a client certificate (mutual TLS)"
        # a source without client_cert_names calls with its key alone on the same port
        assert (await book(no_cert, "epic", epic_body)).status_code == 400

    async with serve_gateway(settings, client_tls=client_tls(pki, "epic")) as other_cert:
        r = await book(other_cert, "cerner", cerner_body)  # a good certificate of someone else
        assert r.status_code == 403 and r.json()["issue"][0]["code"] == "forbidden"
        assert (await book(other_cert, "epic", epic_body)).status_code == 400

    async with serve_gateway(settings, client_tls=client_tls(pki, "forged")) as forged:
        # the right name, signed by a CA the gateway does not trust: the handshake itself fails
        with pytest.raises(httpx.TransportError):
            await book(forged, "cerner", cerner_body)


def test_client_cert_names_need_a_client_ca(tmp_path: Path):
    config = tmp_path / "config"
    shutil.copytree(ROOT / "config", config)
    toml = config / "gateway.toml"
    toml.write_text(toml.read_text().replace("[sources.cerner]\n", '[sources.cerner]\nclient_cert_names = ["cerner.example.org"]\n'))
    with pytest.raises(ConfigError, match=r"sources\.cerner\.client_cert_names: needs \[tls\] client_ca_file"):
        load_file_settings(config)
