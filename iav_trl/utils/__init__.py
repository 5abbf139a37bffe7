"""File helpers shared by the package: atomic writes and caches (`files.py`), adapter files on disk or the Hub
(`hub.py`)."""
