"""The publishing side of bench/run.py, in a process of its own.

    python bench/pusher.py '<json config>'      prints one JSON line of results

Config: {"kind": "flow" | "ref" | "pushcost", "env": {FLOW_...} (flow, pushcost),
"endpoint": XSUB endpoint (ref), "run": id, "users": n, "count": n, "rate": msgs/s (0: as
fast as the call returns), "broadcast": bool, "deadline": seconds, "seed": n,
"user_offset": n (users are user<offset + k>, k < users), "index_offset": n (the first
message's index: several pushers of one run number their messages apart), "channels":
[names] (flow only: message i is flow.publish'ed to channel i % len(names), so each channel
gets its exact share, whatever the split between pushers)}.

Each message's data is {"r": run, "i": index, "t": time.time() at the push, "p": padding},
so clients count distinct messages and measure push-to-receive latency.
"""

from __future__ import annotations

import json
import random
import resource
import sys
import time
from pathlib import Path

import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import flow  # noqa: E402
from flowcore import protocol  # noqa: E402
from flowcore.settings import load_settings  # noqa: E402

PAD = "x" * 48
MESSAGE_ID = "BENCH"
WARMUP_USER = "bench-warmup"  # no client holds it: the warm-up push reaches nobody


def username(n: int) -> str:
    return f"user{n:05d}"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def pushes(config: dict, send) -> dict:
    """Call ``send(user, channel or None, data)`` count times, paced if asked; bounded by the
    deadline. A broadcast has neither user nor channel."""
    rng = random.Random(config.get("seed", 1))
    count, rate, run = config["count"], config.get("rate", 0), config["run"]
    users = config.get("users", 1)
    user_offset, index_offset = config.get("user_offset", 0), config.get("index_offset", 0)
    broadcast = config.get("broadcast", False)
    channels = config.get("channels") or []
    deadline = time.monotonic() + config.get("deadline", 120)
    sent = queue_full = 0
    cpu0 = cpu_seconds()
    t_start = time.time()
    for i in range(count):
        if rate:
            due = t_start + i / rate
            delay = due - time.time()
            if delay > 0:
                time.sleep(delay)
        index = index_offset + i
        channel = channels[index % len(channels)] if channels else None
        user = None if broadcast or channel else username(user_offset + rng.randrange(users))
        while True:
            try:
                send(user, channel, {"r": run, "i": index, "t": time.time(), "p": PAD})
                sent += 1
                break
            except flow.QueueFull:
                # Back-pressure reached the caller: count it, retry a moment later, bounded.
                queue_full += 1
                if time.monotonic() > deadline:
                    break
                time.sleep(0.001)
        if time.monotonic() > deadline:
            break
    t_end = time.time()
    return {"sent": sent, "queue_full": queue_full, "t_start": t_start, "t_end": t_end,
            "cpu": cpu_seconds() - cpu0}


def profiled_publisher_thread(path: str) -> None:
    """Profile the Redis engine's publishing thread (bench/profile_redis.py): cProfile
    sees only the thread it is enabled in."""
    import cProfile

    from flowcore.engines import redis as redis_engine

    run = redis_engine.RedisPublisherEngine._run

    def _run(self) -> None:
        profile = cProfile.Profile()
        try:
            profile.runcall(run, self)
        finally:
            profile.dump_stats(path)

    redis_engine.RedisPublisherEngine._run = _run  # type: ignore[method-assign]


def run_flow(config: dict) -> dict:
    if config.get("profile"):
        profiled_publisher_thread(config["profile"])
    publisher = flow.Flow(settings=load_settings(config["env"]))
    # Connected before the clock starts, as the reference's pusher is after its settle:
    # the first push opens the socket, and pushes made before the connection is up wait
    # in it (up to 7 ms here), which would time a process's start-up as push latency.
    publisher.push(WARMUP_USER, MESSAGE_ID, None)
    if publisher.flush(timeout=10):
        raise SystemExit("the engine did not confirm the warm-up push within 10 s")

    def send(user, channel, data):
        if channel is not None:
            publisher.publish(channel, MESSAGE_ID, data)
        elif user is None:
            publisher.push_all(MESSAGE_ID, data)
        else:
            publisher.push(user, MESSAGE_ID, data)

    result = pushes(config, send)
    publisher.close()  # flushes what is still queued (FLOW_PUSH_LINGER)
    result["t_closed"] = time.time()
    return result


def run_ref(config: dict) -> dict:
    if config.get("channels"):
        raise SystemExit("the reference relay has no channels")
    context = zmq.Context()
    pub = context.socket(zmq.PUB)
    pub.connect(config["endpoint"])
    time.sleep(config.get("settle", 1.0))  # PUB/SUB slow joiner: let subscriptions arrive

    def send(user, channel, data):
        name = "*" if user is None else user
        body = json.dumps({"id": MESSAGE_ID, "username": name, "data": data})
        pub.send_multipart([name.encode(), body.encode()])

    result = pushes(config, send)
    pub.close(linger=5000)
    context.term()
    result["t_closed"] = time.time()
    return result


def run_pushcost(config: dict) -> dict:
    """Seconds per call: flow.Flow.push vs a raw PUSH send of the same bytes."""
    settings = load_settings(config["env"])
    n, repeats = config["count"], config.get("repeats", 5)
    publisher = flow.Flow(settings=settings)
    context = zmq.Context()
    raw = context.socket(zmq.PUSH)
    raw.setsockopt(zmq.SNDHWM, settings.push_queue)
    raw.connect(settings.publish_endpoint)
    data = {"r": "pushcost", "i": 0, "t": time.time(), "p": PAD}
    user = "nobody-listens"
    frame = protocol.encode_push(user, MESSAGE_ID, data, settings.max_message)
    publisher.push(user, MESSAGE_ID, data)  # open the socket outside the timing
    raw.send(frame)
    time.sleep(0.2)
    # Short bursts, raw and Flow taking turns, timed in this thread's CPU time: on a
    # 2-core machine the proxy draining the last burst competes for the CPU, and wall time
    # would charge that to whichever burst it overlaps. Best burst of each kind.
    best = {"flow": float("inf"), "raw": float("inf")}
    best_wall = dict(best)
    burst = max(1, n // 5)

    def time_burst(kind: str) -> None:
        w0, t0 = time.perf_counter(), time.thread_time()
        if kind == "raw":
            for _ in range(burst):
                raw.send(frame, zmq.NOBLOCK)
        else:
            for _ in range(burst):
                publisher.push(user, MESSAGE_ID, data)
        best[kind] = min(best[kind], (time.thread_time() - t0) / burst)
        best_wall[kind] = min(best_wall[kind], (time.perf_counter() - w0) / burst)
        time.sleep(burst / 100_000)  # let the proxy drain: measure the call, not a full queue

    for r in range(repeats * 5):
        for kind in (("raw", "flow") if r % 2 == 0 else ("flow", "raw")):
            time_burst(kind)
    publisher.close()
    raw.close(linger=5000)
    context.term()
    return {"flow_push": best["flow"], "raw_send": best["raw"], "flow_push_wall": best_wall["flow"],
            "raw_send_wall": best_wall["raw"], "burst": burst, "bursts": repeats * 5}


def main() -> None:
    config = json.loads(sys.argv[1])
    runner = {"flow": run_flow, "ref": run_ref, "pushcost": run_pushcost}[config["kind"]]
    print(json.dumps(runner(config)), flush=True)


if __name__ == "__main__":
    main()
