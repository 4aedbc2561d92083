"""The one error devstack raises."""

from __future__ import annotations


class DevStackError(Exception):
    """The servers could not be started; the message says why and what to do."""
