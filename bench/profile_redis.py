"""Where the time goes on the Redis engine: one bench workload with every process profiled.

    python bench/profile_redis.py                         # W1 (flood), no persistence
    python bench/profile_redis.py --workload W4           # paced at 3,000 msgs/s
    python bench/profile_redis.py --workload W5 --count 20000   # channel publishes, 100 channels
    python bench/profile_redis.py --persistence aof       # the shipped redis-server
    python bench/profile_redis.py --engine zmq            # the same on the ZeroMQ engine

The stack of bench/run.py (its processes, clients and pusher), with both WebSocket
servers under cProfile and the pusher's publishing thread (Redis engine) too; prints,
per kind of process, the functions with the most time of their own (tottime) as a
share of the process's profiled time, and Redis's INFO commandstats for the run (µs
inside each command; a script's time includes the commands it called). A profiler slows
what it watches (by 1.5x to 2x here): read the shares, not the rates.
"""

from __future__ import annotations

import argparse
import pstats
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # noqa: E402  (bench/run.py: the stack, the clients, the pusher)


class ProfiledFlow(run.Flow):
    def __init__(self, *args: Any, profile_dir: Path, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.profile_dir = profile_dir

    def server_command(self, i: int) -> list[str]:
        # cProfile writes its file when the server returns from main (it does at SIGTERM).
        return [run.PYTHON, "-m", "cProfile", "-o", str(self.profile_dir / f"websocket-{i}.prof"),
                "websocket_server.py"]

    def pusher(self) -> dict[str, Any]:
        config = super().pusher()
        if self.engine == "redis":
            config["profile"] = str(self.profile_dir / "publisher-thread.prof")
        return config


def top(paths: list[Path], limit: int) -> list[str]:
    """The ``limit`` functions with the most own time over ``paths``, as shares of it."""
    found = [str(p) for p in paths if p.is_file()]
    if not found:
        return ["  (no profile written)"]
    stats = pstats.Stats(*found)
    total = stats.total_tt  # type: ignore[attr-defined]
    rows = []
    entries = stats.stats  # type: ignore[attr-defined]
    for (filename, line, name), (_cc, ncalls, tottime, cumtime, _callers) in entries.items():
        rows.append((tottime, cumtime, ncalls, f"{Path(filename).name}:{line}({name})"))
    rows.sort(reverse=True)
    out = [f"  {len(found)} process(es), {total:.2f} s profiled; own time, cumulative, calls, function"]
    for tottime, cumtime, ncalls, where in rows[:limit]:
        out.append(f"  {100 * tottime / total:5.1f}%  {100 * cumtime / total:5.1f}%  {ncalls:>9}  {where}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=("W1", "W4", "W5"), default="W1")
    parser.add_argument("--engine", choices=run.ENGINES, default="redis")
    parser.add_argument("--persistence", choices=run.PERSISTENCE, default="none")
    parser.add_argument("--count", type=int, default=50_000)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rate", type=int, default=3000, help="W4's pace, msgs/s")
    parser.add_argument("--channels", type=int, default=100, help="W5's channels (clients spread evenly)")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    bench_args = argparse.Namespace(quick=False, client="node" if run.node_client_available() else "python",
                                    client_procs=0, only=[args.workload], engines=[args.engine],
                                    redis_persistence=[args.persistence], json=None)
    bench_args.client_procs = 1 if bench_args.client == "node" else 2
    bench = run.Bench(bench_args)
    profile_dir = bench.workdir / "profiles"
    profile_dir.mkdir()
    system = ProfiledFlow(bench.workdir, bench.secret, engine=args.engine, persistence=args.persistence,
                          profile_dir=profile_dir)
    clients = None
    try:
        system.start()
        names = [f"bench:{k:03d}" for k in range(args.channels)] if args.workload == "W5" else None
        clients = bench.clients(system, args.clients, channels=names)
        rate = args.rate if args.workload == "W4" else 0
        run.log(f"{system.name}: {args.workload}, {args.count} pushes to {args.clients} users"
                + (f" on {args.channels} channels" if names else "")
                + (f" at {rate}/s" if rate else ", flood") + ", profiled")
        result = bench.push_run(system, clients, args.workload, args.count, args.clients, rate=rate,
                                channels=names)
    finally:
        if clients is not None:
            clients.close()
        run.log(f"{system.name}: stopped (exit codes {system.stop()})")
    time.sleep(0.5)  # the pusher's thread wrote its profile at close; the servers theirs at exit
    print(f"{system.name} {args.workload}: delivered {result['delivered']} of {result['sent']}, "
          f"{result['rate']:,.0f} msgs/s (profiled), p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms; "
          f"CPU s: servers {result['cpu_servers']:.2f} (engine {result['cpu_engine']:.2f}), "
          f"pusher {result['cpu_pusher']:.2f}, clients {result['cpu_clients']:.2f}")
    print("\nWebSocket servers:")
    print("\n".join(top(sorted(profile_dir.glob("websocket-*.prof")), args.top)))
    if args.engine == "redis":
        print("\nthe pusher's publishing thread:")
        print("\n".join(top([profile_dir / "publisher-thread.prof"], args.top)))
        redis = result.get("redis") or {}
        delivered = max(1, result["delivered"])
        print(f"\nRedis (INFO commandstats over the run; {redis.get('cpu_seconds', 0):.2f} CPU s):")
        for name, n in redis.get("calls", {}).items():
            usec = redis.get("usec", {}).get(name, 0)
            print(f"  {name:<14} {n:>9} calls  {n / delivered:6.3f}/msg  {usec / max(1, n):7.2f} µs/call  "
                  f"{usec / delivered:6.2f} µs/msg")
    lost = result["delivered"] < result["sent"] or result["dups"] or result["seq_gaps"] or result["foreign"]
    if not lost:
        import shutil

        shutil.rmtree(bench.workdir, ignore_errors=True)
    else:
        print(f"\n!!! lost or duplicated messages; logs and profiles kept in {bench.workdir}")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
