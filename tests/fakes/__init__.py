"""Contract-faithful fakes of the services derpbox talks to, for tests.

Each fake follows the upstream contract in the spec (derp-protocol.md section 5),
not derpbox's client code, so tests against them catch client-side mistakes.
"""
