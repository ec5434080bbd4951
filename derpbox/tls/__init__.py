"""Certificates and TLS contexts: manual files, self-signed IP certs, the meta-certificate.

- :mod:`.metacert`: the Ed25519 "derpkey" meta-certificate (spec 8.3).
- :mod:`.certs`: certificate sources (:class:`~.certs.CertificateSource`), the
  manual cert-dir source, IP self-signed certificates and the suggested DERPNode.
- :mod:`.context`: :class:`~.context.ServerTLS`, the pyOpenSSL context factory
  for the Twisted TLS listener (SNI rule, ALPN, meta-cert appended).
"""
