from collections.abc import Coroutine
from typing import Any

def resume(coro: Coroutine[Any, Any, Any], value: object, /) -> bool:
    """Send `value` into `coro`; True once it has finished (errors propagate)."""
