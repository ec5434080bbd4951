"""Twisted HTTP adapters: the /derp upgrade, WebSocket, and the plain endpoints."""
