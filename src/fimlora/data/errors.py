"""The one exception the data layer raises for bad user data.

Every message is a single line that names the problem and how to fix it, so a CLI can print it as-is.
"""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """A data file or dataset is missing, malformed, or does not match the requested columns/labels."""
