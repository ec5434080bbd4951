"""Sans-IO protocol codecs: bytes in, events and bytes out, no reactor."""
