"""EMMA: Emergency Medicine Multimodal Assistant."""

__version__ = "0.1.0"
