"""The benchmark still runs (bench/run.py --quick): tiny sizes, so it cannot rot.

Figures from a quick run mean nothing; what is checked is that every workload completes
against the reference relay and Flow on both engines (the Redis engine without
persistence and as shipped, and SCALE's two hosts on one Redis), the tables are printed,
and Flow delivered every message it accepted (W5's channels: to every socket of the
channel, in seq order, and to no other). The load client is Node's `ws` when
bench/node_modules has it, else the plain-Python client; the Python client is also run
on its own so neither rots.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from support import ROOT

RUN = ROOT / "bench" / "run.py"
NODE_CLIENT = (ROOT / "bench" / "node_modules" / "ws" / "package.json").is_file()


def run_bench(tmp_path: Path, *args: str) -> tuple[str, dict]:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--no-install", "--json", str(out), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, f"bench failed ({done.returncode}):\n{done.stdout}\n{done.stderr[-4000:]}"
    return done.stdout, json.loads(out.read_text())


def assert_flow_delivered_everything(results: dict, workloads: tuple[str, ...]) -> None:
    for key in ("flow", "flow_history_off", "flow_redis", "flow_redis_aof", "scale"):
        for w in workloads:
            r = results.get(key, {}).get(w)
            if r is None:
                continue
            assert r["sent"] > 0
            assert r["delivered"] == r["sent"] and r["dups"] == 0, (key, w, r)
            assert r.get("seq_gaps", 0) == 0 and r.get("foreign", 0) == 0 and r["missing"] == 0, (key, w, r)


def test_quick_bench_runs_every_workload(tmp_path: Path) -> None:
    stdout, results = run_bench(tmp_path)
    for label in ("W1 delivered/sent", "W1 msgs/s", "W1 history off", "W2 deliveries/s",
                  "W3 KiB/connection", "W4 p99 ms", "flow.push us/call", "W5 deliveries/s", "W5/W2"):
        assert label in stdout, stdout
    assert "LOST" not in stdout.split("reference")[0]
    assert results["meta"]["client"] == ("node" if NODE_CLIENT else "python")
    assert set(results["flow"]) == {"W1", "W2", "W3", "W4", "W5", "PUSH"}
    assert set(results["reference"]) == {"W1", "W2", "W3", "W4"}  # the reference has no channels
    assert set(results["flow_history_off"]) == {"W1"}
    assert set(results["flow_redis"]) == {"W1", "W2", "W3", "W4", "W5"}
    assert set(results["flow_redis_aof"]) == {"W1", "W2", "W4", "W5"}
    assert set(results["scale"]) == {"one_host", "two_hosts"}
    assert_flow_delivered_everything(results, ("W1", "W2", "W4", "W5", "one_host", "two_hosts"))
    assert_w5_ran_on_channels(results, ("flow", "flow_redis", "flow_redis_aof"))
    # The Redis side really ran on Redis, each configuration as it says: Redis counted
    # a PUBLISH per message, and the shipped one had its append-only file on.
    for key, aof in (("flow_redis", 0), ("flow_redis_aof", 1)):
        redis = results[key]["W1"]["redis"]
        assert redis["calls"]["publish"] >= results[key]["W1"]["pushed"], redis
        assert redis["aof_enabled"] == aof, redis
    assert results["scale"]["two_hosts"]["pushers"] == 2
    for label in ("Redis engine", "vs zmq", "SCALE", "two hosts"):
        assert label in stdout, stdout
    for key in ("reference", "flow", "flow_redis"):
        assert results[key]["W3"]["clients"] > 0
        assert results[key]["W3"]["refused"] == 0
    # As in production: W3's clients reach Flow's pool through the shipped nginx.
    assert results["flow"]["W3"]["through"] == "nginx"
    assert results["flow_redis"]["W3"]["through"] == "nginx"
    push = results["flow"]["PUSH"]
    assert push["flow_push"] > 0 and push["raw_send"] > 0
    # Each W4 round says where its tail came from (from arrival times the client keeps).
    assert "W4 longest stall ms, by round" in stdout, stdout
    for key in ("reference", "flow"):
        for r in results[key]["W4"]["rounds"]:
            assert set(r["stalls"]) == {"slow", "stalls", "longest_ms", "worst"}, r


def test_stalls_are_runs_of_slow_messages():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_run", RUN)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = bench  # its dataclasses look their module up
    try:
        spec.loader.exec_module(bench)
    finally:
        del sys.modules["bench_run"]
    # (arrival ms, latency ms), out of order as the clients report them.
    pairs = [(100.0, 0.2), (203.0, 1.5), (200.0, 4.0), (201.0, 3.0), (500.0, 0.3),
             (900.0, 2.0), (906.0, 1.2), (1000.0, 1.0)]
    assert bench.stalls(pairs) == {
        "slow": 5, "stalls": 3, "longest_ms": 4.0, "worst": [[4.0, 3], [2.0, 1], [1.2, 1]],
    }
    assert bench.stalls([]) == {"slow": 0, "stalls": 0, "longest_ms": 0.0, "worst": []}


def assert_w5_ran_on_channels(results: dict, keys: tuple[str, ...]) -> None:
    """W5 published on channels: each message owed to its channel's share of the sockets."""
    sizes = results["meta"]["sizes"]
    for key in keys:
        w5 = results[key]["W5"]
        assert w5["channels"] == sizes["w5_channels"], w5
        assert w5["per_channel"] == sizes["clients"] // sizes["w5_channels"] > 1, w5
        assert w5["pushed"] == sizes["w5_count"] and w5["sent"] == w5["pushed"] * w5["per_channel"], w5
        if "redis" in w5:  # one PUBLISH per channel message, on its own channel
            assert w5["redis"]["calls"]["publish"] >= w5["pushed"], w5["redis"]


def test_quick_bench_with_the_python_client(tmp_path: Path) -> None:
    stdout, results = run_bench(tmp_path, "--client", "python", "--only", "W1,W2,W5", "--redis-persistence", "none")
    assert "W1 delivered/sent" in stdout and "W2 deliveries/s" in stdout and "W5/W2" in stdout, stdout
    assert results["meta"]["client"] == "python"
    assert set(results["flow_redis"]) == {"W1", "W2", "W5"} and "flow_redis_aof" not in results
    assert "W5" not in results["reference"]
    assert_flow_delivered_everything(results, ("W1", "W2", "W5"))
    assert_w5_ran_on_channels(results, ("flow", "flow_redis"))
