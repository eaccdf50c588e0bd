__version__ = "0.1.0.dev0"
"""The installed version of kling-async."""
