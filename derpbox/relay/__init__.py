"""The relay's brain: registry of clients, routing, per-client queues. No sockets."""
