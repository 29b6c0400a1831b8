"""Mutual TLS per source: a source with `client_cert_names` must call over TLS with a client
certificate, verified by the TLS handshake against `[tls] client_ca_file`, that names it.

The certificate reaches the app through the ASGI TLS extension (`gateway.edges.http_protocol` fills it in).
A certificate is matched by its subject CN and its DNS subject-alternative names. This check comes
on top of the source's key or token, never instead of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from gateway.errors import Forbidden, Unauthorized
from gateway.settings import SourceSettings

__all__ = ["ClientCertificates", "certificate_names"]


@lru_cache(maxsize=256)  # one parse per distinct certificate, not per request
def certificate_names(pem: str) -> frozenset[str]:
    cert = x509.load_pem_x509_certificate(pem.encode())
    names = {str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)}
    try:
        names.update(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                     .get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        pass
    return frozenset(n.lower() for n in names)


class ClientCertificates:
    def __init__(self, sources: Mapping[str, SourceSettings]) -> None:
        self._wanted = {name: frozenset(n.lower() for n in s.client_cert_names)
                        for name, s in sources.items() if s.client_cert_names}

    def check(self, source: str, scope: Mapping[str, Any]) -> None:
        wanted = self._wanted.get(source)
        if wanted is None:
            return
        chain = ((scope.get("extensions") or {}).get("tls") or {}).get("client_cert_chain") or ()
        if not chain:
            raise Unauthorized("this source calls with a client certificate (mutual TLS)")
        if not certificate_names(chain[0]) & wanted:
            raise Forbidden("the client certificate belongs to another source")
