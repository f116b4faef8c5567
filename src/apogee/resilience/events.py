"""``RUN_DIR/events.jsonl``: one JSON object per failure, diagnosis, restart, fallback or drill.

Several processes append (the launcher and rank 0 of each attempt): each record is one ``write`` on
a file opened with ``O_APPEND``, which POSIX keeps whole for lines this short.
"""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

EVENTS = "events.jsonl"


class EventLog:
    def __init__(self, run_dir: Path, *, source: str, enabled: bool = True):
        self.path = Path(run_dir) / EVENTS
        self.source = source
        self.enabled = enabled

    def __call__(self, kind: str, **fields: Any) -> dict:
        return self.emit(kind, **fields)

    def emit(self, kind: str, **fields: Any) -> dict:
        now = time.time()
        record = {
            "time": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="milliseconds"),
            "t": round(now, 3),
            "event": kind,
            "source": self.source,
            "host": socket.gethostname(),
            **fields,
        }
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            line = (json.dumps(record, default=str) + "\n").encode()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        return record


def read_events(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / EVENTS
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
