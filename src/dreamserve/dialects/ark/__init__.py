"""ByteDance's Ark images API (``/api/v3/images/generations``): decode, render, routes."""
