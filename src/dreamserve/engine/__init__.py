"""The diffusers runtime. Only the model child process imports this package (it imports torch)."""

from dreamserve.engine.loader import WeightsNotFound
from dreamserve.engine.runner import Engine
from dreamserve.jobs import Interrupted

__all__ = ["Engine", "Interrupted", "WeightsNotFound"]
