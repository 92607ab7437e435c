#!/usr/bin/env python3
"""Connection storm client for bench/twohop.sh.

Opens CONNS HTTP/1.1 connections to HOST:PORT at once, waits until every one is open (or
has failed), then each sends REQS requests one after another on its connection (keep-alive)
and closes it. Prints one JSON object: connections opened, requests answered 200, errors by
kind, request latency percentiles (from writing a request to reading its whole response)
and connect latency percentiles, in milliseconds, and the wall time.

    python3 bench/lib/storm.py HOST PORT [CONNS] [REQS] [TIMEOUT_S]

Every wait is bounded by TIMEOUT_S (default 30), the whole run by twice that.
"""

import asyncio
import json
import sys
import time


def pct(samples, q):
    if not samples:
        return None
    s = sorted(samples)
    return round(s[min(len(s) - 1, int(q * len(s)))] * 1000, 3)


async def read_response(reader):
    """Reads one response; returns its status. Needs Content-Length (what every proxy here sends)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
        elif name.strip().lower() == b"transfer-encoding" and b"chunked" in value.lower():
            raise ValueError("chunked response")
    if length is None:
        raise ValueError("response without content-length")
    await reader.readexactly(length)
    return status


async def one(host, port, reqs, timeout, opened, start, out):
    t0 = time.perf_counter()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except Exception as e:  # every failure is counted by kind, none stops the storm
        out["errors"][f"connect: {type(e).__name__}"] = out["errors"].get(f"connect: {type(e).__name__}", 0) + 1
        opened()
        return
    out["connect"].append(time.perf_counter() - t0)
    out["connected"] += 1
    opened()
    try:
        await asyncio.wait_for(start.wait(), timeout)
        req = f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: trellis-storm\r\n\r\n".encode()
        for _ in range(reqs):
            t = time.perf_counter()
            writer.write(req)
            status = await asyncio.wait_for(read_response(reader), timeout)
            if status == 200:
                out["latency"].append(time.perf_counter() - t)
                out["ok"] += 1
            else:
                out["errors"][f"status {status}"] = out["errors"].get(f"status {status}", 0) + 1
    except Exception as e:
        kind = f"request: {type(e).__name__}"
        out["errors"][kind] = out["errors"].get(kind, 0) + 1
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), timeout)
        except Exception:
            pass


async def main():
    host, port = sys.argv[1], int(sys.argv[2])
    conns = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
    reqs = int(sys.argv[4]) if len(sys.argv) > 4 else 5
    timeout = float(sys.argv[5]) if len(sys.argv) > 5 else 30.0
    out = {"connected": 0, "ok": 0, "errors": {}, "connect": [], "latency": []}
    start = asyncio.Event()
    pending = conns

    def opened():
        nonlocal pending
        pending -= 1
        if pending == 0:
            start.set()  # every connection is open (or failed): all send at once

    t0 = time.perf_counter()
    tasks = [asyncio.create_task(one(host, port, reqs, timeout, opened, start, out)) for _ in range(conns)]
    await asyncio.wait_for(asyncio.gather(*tasks), 2 * timeout)
    wall = time.perf_counter() - t0
    print(json.dumps({
        "conns": conns,
        "requests_per_conn": reqs,
        "connected": out["connected"],
        "ok": out["ok"],
        "failed_requests": conns * reqs - out["ok"],
        "errors": sum(out["errors"].values()),
        "error_kinds": out["errors"],
        "p50_ms": pct(out["latency"], 0.50),
        "p99_ms": pct(out["latency"], 0.99),
        "max_ms": pct(out["latency"], 1.0),
        "connect_p99_ms": pct(out["connect"], 0.99),
        "wall_s": round(wall, 3),
    }))


if __name__ == "__main__":
    asyncio.run(main())
