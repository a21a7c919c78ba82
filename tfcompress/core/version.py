"""The package version, in the ground floor so any layer can name it without importing the root package."""

__version__ = "0.1.0"
