"""tirforge: tool-integrated mathematical reasoning."""

__version__ = "0.1.0"
