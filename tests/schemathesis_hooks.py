"""Schemathesis hooks of tests/test_fuzz.py (loaded through ``SCHEMATHESIS_HOOKS``).

A classify with a deadline too short for its images is answered 504 by design (the
deadline passed; tests/test_server.py checks it), and the fuzzing looks for server errors:
so a generated deadline that is a valid one is lengthened to at least a minute. Invalid
values (negative, zero, not a number) are sent as generated and must be 400s.
"""

from __future__ import annotations

import math
from typing import Any

import schemathesis

SHORTEST_MS = 60_000.0


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    query = case.query
    if isinstance(query, dict) and "timeout_ms" in query:
        try:
            value = float(query["timeout_ms"])
        except (TypeError, ValueError):
            value = math.nan
        if math.isfinite(value) and 0 < value < SHORTEST_MS:
            query["timeout_ms"] = SHORTEST_MS
    body = case.body
    parameters = body.get("parameters") if isinstance(body, dict) else None
    if isinstance(parameters, dict):
        timeout = parameters.get("timeout")
        if isinstance(timeout, int) and not isinstance(timeout, bool) and 0 < timeout < SHORTEST_MS * 1000:
            parameters["timeout"] = int(SHORTEST_MS * 1000)
    return case
