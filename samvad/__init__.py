"""samvad: a session backend for conversational-AI agents."""

__version__ = "0.1.0"
