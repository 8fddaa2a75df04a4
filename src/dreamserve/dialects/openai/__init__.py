"""OpenAI's images API (``/v1/images/generations``, ``/v1/images/edits``): decode, render, routes."""
