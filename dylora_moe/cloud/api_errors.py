"""What a Google API error says, for our one-paragraph messages."""

from __future__ import annotations

import re
from typing import Any


def server_message(error: Any) -> str:
    """The server's words, without the REST transport's 'METHOD URL: ' prefix."""
    return re.sub(r"^(GET|POST|PUT|PATCH|DELETE) \S+: ", "", str(getattr(error, "message", "") or error))
