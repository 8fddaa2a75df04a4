"""Replicate's HTTP API (predictions, models, files, webhooks): decode, render, routes."""
