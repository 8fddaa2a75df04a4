"""HTTP and WebSocket surface. Never imports torch or the engine."""
