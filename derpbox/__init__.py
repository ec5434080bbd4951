"""derpbox: a DERP relay for Tailscale clients, on Twisted."""

__version__ = "0.1.0"
