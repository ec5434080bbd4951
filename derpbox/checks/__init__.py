"""``derpbox healthcheck`` (the local instance, for Docker HEALTHCHECK) and
``derpbox check`` (any DERP node or DERP map, as a Tailscale client sees it).

Both print one line per check (``ok``/``WARN``/``FAIL``/``skip``) and exit 0 only
when nothing failed. ``check`` adds ``DIAGNOSIS:`` lines for the usual deployment
mistakes and can print JSON. Every network step has a short timeout; checks of a
node run concurrently in daemon threads so a silent peer cannot stall the run.

- results: a check's Result, CheckFailed, the statuses, error texts
- runner: running checks concurrently with a deadline
- certificates: Tailscale's CertName rules, validity, chain verification
- probes: the network steps (TLS, HTTP, the /derp upgrade, STUN, a relayed packet, an idle connection)
- healthcheck: ``derpbox healthcheck``
- targets: the nodes to check, from a host, URL or DERP map
- node: the checks of one DERP node, as a Tailscale client sees it
- command: ``derpbox check``
"""
