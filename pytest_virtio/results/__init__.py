"""What a session measured and what it concluded.

``records`` (one Record per round, RelativeCheck, SessionResults, the JSON
format), ``metrics`` (the one metrics table and aggregate), ``perf`` (the
``perf`` marker's checks, judged on records only), ``baseline`` (saved
baselines and regressions), ``render`` (terminal table, junit properties),
``plot`` (the chart), ``finish`` (session end: judge and write every output);
``python -m pytest_virtio.results merge`` judges shards together.
"""

from __future__ import annotations

from pytest_virtio.results.records import Record, RelativeCheck, SessionResults

__all__ = ["Record", "RelativeCheck", "SessionResults"]
