"""Certificates and TLS contexts: manual files, self-signed IP certs, the meta-certificate."""
