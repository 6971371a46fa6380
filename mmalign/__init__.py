"""mmalign: align image, video and audio generative models with reward models."""
from __future__ import annotations

__version__ = "0.1.0"
