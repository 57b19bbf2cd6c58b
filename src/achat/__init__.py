"""achat: real-time chat that starts in seconds on one machine and joins from any terminal."""

__all__ = ["__version__"]

__version__ = "0.1.0"
