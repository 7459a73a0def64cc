"""Figures measured by a test module, reported at the end of the run.

A module keeps its own `MEASURED` dict (key -> list of samples, seconds
unless the key names another unit) and installs the report with

    MEASURED: dict[str, list[float]] = defaultdict(list)
    _report_measurements = report_fixture(
        "mxsse-sse-measurements", "SSE measurements (seconds unless named otherwise)",
        "MXSSE_SSE_REPORT", MEASURED)

The autouse fixture registers a `MeasurementReport` plugin (once per
name), whose terminal summary prints n/min/median/max per key and, when
the environment variable is set, writes {"summary": {key: {n, min,
median, p90, max}}, "samples": MEASURED} as JSON to the file it names.

`synapse_sync_requests(bed)` reads Synapse's own /sync request counter,
for figures on what streams cost upstream.
"""

from __future__ import annotations

import json
import os
import statistics
import urllib.request
from typing import Any

import pytest


class MeasurementReport:
    """Prints `measured` in pytest's terminal summary (and writes the JSON)."""

    def __init__(self, title: str, env_var: str, measured: dict[str, list[float]],
                 key_width: int = 46):
        self.title = title
        self.env_var = env_var
        self.measured = measured
        self.key_width = key_width

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        measured = self.measured
        if not measured:
            return
        summary = {}
        terminalreporter.section(self.title)
        for key in sorted(measured):
            vals = sorted(measured[key])
            median = statistics.median(vals)
            summary[key] = {"n": len(vals), "min": vals[0], "median": median,
                            "p90": vals[min(len(vals) - 1, int(0.9 * len(vals)))], "max": vals[-1]}
            terminalreporter.write_line(
                f"{key:<{self.key_width}} n={len(vals):<3} min={vals[0]:.3f} "
                f"median={median:.3f} max={vals[-1]:.3f}")
        path = os.environ.get(self.env_var)
        if path:
            with open(path, "w") as f:
                json.dump({"summary": summary, "samples": measured}, f, indent=2, sort_keys=True)


def report_fixture(name: str, title: str, env_var: str, measured: dict[str, list[float]],
                   key_width: int = 46) -> Any:
    """An autouse module fixture registering a MeasurementReport as plugin
    `name`; assign it to `_report_measurements` in the test module."""

    @pytest.fixture(scope="module", autouse=True, name="_report_measurements")
    def _report_measurements(request: pytest.FixtureRequest):
        if not request.config.pluginmanager.has_plugin(name):
            request.config.pluginmanager.register(
                MeasurementReport(title, env_var, measured, key_width), name)
        yield

    return _report_measurements


def synapse_sync_requests(bed: Any) -> float:
    """Synapse's own count of GET /sync requests received (all users)."""
    with urllib.request.urlopen(bed.metrics_url, timeout=10) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if (line.startswith("synapse_http_server_requests_received_total{")
                and 'servlet="SyncRestServlet"' in line and 'method="GET"' in line):
            total += float(line.rsplit(" ", 1)[1])
    return total
