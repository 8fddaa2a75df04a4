"""Wiro's request and response shapes: parameters, sizes, the rendering of tasks, files and tools."""
