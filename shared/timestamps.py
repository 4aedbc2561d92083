"""The contract's one datetime type.

Every instant on the wire (HTTP bodies and events) is timezone-aware RFC 3339. Declaring it
with ``tz=True`` makes the published schemas say ``format: date-time`` (so generated clients
get real datetimes, not strings) and makes decoding refuse a naive time, which could mean
any zone.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec

Timestamp = Annotated[datetime, msgspec.Meta(tz=True)]
