"""The soak, small: 5,000 commands over 16 connections with random disconnects and client
timeouts, seeded (``bench/soak.py`` has the design; ``python -m bench.soak`` runs the full size).

Every request gets exactly one outcome, no reply is duplicated, and the client's tally matches
``rpc.stats`` exactly (requests_total, errors_by_code, replies_total, connections_total).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

import pytest
from reliability_helpers import (
    REPO,
)

from statemachines import errorkinds as ek

SEED = int(os.environ.get("STATELINK_SOAK_SEED", "5000"))


@pytest.fixture(scope="module")
def soak() -> ModuleType:
    path = REPO / "bench" / "soak.py"
    spec = importlib.util.spec_from_file_location("statelink_bench_soak", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_soak_small(soak):
    options = soak.Options(commands=5000, connections=16, seed=SEED, deadline=45.0)
    report = soak.run_soak(options)
    print(soak.format_report(report))
    assert report["mismatches"] == [], soak.format_report(report)
    outcomes = report["outcomes"]
    # every kind of outcome really happened, so the exactness was tested under all of them
    assert report["requests"] + report["notifications"] == 5000
    assert sum(outcomes.values()) == report["requests"]
    assert report["disconnects"] >= 5 and outcomes.get("lost", 0) >= 1
    assert outcomes.get("client_timeout", 0) >= 10
    for code in (
        str(ek.TIMEOUT),
        str(ek.DEVICE_FAULT),
        str(ek.METHOD_NOT_FOUND),
        str(ek.INVALID_PARAMS),
    ):
        assert outcomes.get(code, 0) >= 10, code
    assert report["duplicated_replies"] == 0
    stats, expected = report["server_stats"], report["expected"]
    assert stats["requests_total"] == expected["requests_total"]
    assert stats["errors_by_code"] == expected["errors_by_code"]
