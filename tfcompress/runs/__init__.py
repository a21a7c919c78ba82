"""Orchestration: the convert and optimize runs, their configs, the demo. The top floor: it may import every
phase; nothing in tfcompress imports it (the public API in `tfcompress/__init__.py` re-exports from it)."""
