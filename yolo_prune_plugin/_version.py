"""The plugin's version (its own module, so that any module can import it without importing the package API)."""

__version__ = "0.2.0"
