#!/usr/bin/env python3
"""Hardening probes against a running `serve` (Python standard library only).

    serve --model FILE.gguf --port 8000 &
    python3 crates/serve/examples/probe.py --url http://127.0.0.1:8000 --pid $! [burst] [slow] [soak]

- burst: 8 concurrent 4 MiB prompts, to /v1/completions then /v1/chat/completions: status,
  time, and (with --pid) the server's peak resident memory over its idle size (the kernel's
  high-water mark is reset first: /proc/PID/clear_refs).
- slow: normal requests' latency (p50/p99 of 40) alone, then while 300 idle connections and 200
  slow-header ones (a header byte a second) are held open.
- soak: --seconds of 8 clients sending a mix: normal and streamed completions and chats, 10 %
  malformed bodies, streams dropped mid-way, bursts beyond the queue. Prints the status counts
  (any 5xx is a failure), and the resident memory at the start and the end.

Exits non-zero if a probe finds a 5xx or a refused normal request.
"""

import argparse
import http.client
import json
import random
import socket
import threading
import time
import urllib.parse

P = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
P.add_argument("probes", nargs="*", default=["burst", "slow", "soak"])
P.add_argument("--url", default="http://127.0.0.1:8000")
P.add_argument("--pid", type=int, help="the server's pid, to read its memory")
P.add_argument("--seconds", type=float, default=60.0)
A = P.parse_args()
U = urllib.parse.urlparse(A.url)
HOST, PORT = U.hostname, U.port or 80
failed = False


def rss(field="VmRSS"):
    if not A.pid:
        return None
    for line in open(f"/proc/{A.pid}/status"):
        if line.startswith(field):
            return int(line.split()[1]) // 1024
    return None


def request(path, body=None, raw=None, stream=False, drop_after=None, timeout=120):
    """(status, seconds) of one request on a fresh connection."""
    t = time.time()
    c = http.client.HTTPConnection(HOST, PORT, timeout=timeout)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        c.request("POST" if data is not None else "GET", path, body=data, headers={"content-type": "application/json"})
        r = c.getresponse()
        if drop_after is not None:
            r.read(drop_after)
            c.sock.shutdown(socket.SHUT_RDWR)
        else:
            r.read()
        return r.status, time.time() - t
    except OSError as e:
        return f"error: {e.__class__.__name__}", time.time() - t
    finally:
        c.close()


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def burst():
    global failed
    random.seed(0)
    words = "the quick brown fox jumps over the lazy dog and then some".split()
    text = " ".join(random.choice(words) for _ in range(800_000))[: (4 << 20) - 200]
    for path, body in [("/v1/completions", {"prompt": text, "max_tokens": 8}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": text}], "max_tokens": 8})]:
        if A.pid:
            with open(f"/proc/{A.pid}/clear_refs", "w") as f:
                f.write("5")
        idle = rss()
        out = []
        ts = [threading.Thread(target=lambda: out.append(request(path, body))) for _ in range(8)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        codes = sorted({c for c, _ in out}, key=str)
        mem = f", peak {rss('VmHWM') - idle} MB over idle ({idle} MB)" if A.pid else ""
        print(f"burst {path}: statuses {codes}, {min(d for _, d in out):.2f}-{max(d for _, d in out):.2f} s{mem}")
        failed |= any(not isinstance(c, int) or c >= 500 for c, _ in out)


NORMAL = {"prompt": "Hello", "max_tokens": 8, "temperature": 0}


def latencies(n=40):
    out = [request("/v1/completions", NORMAL) for _ in range(n)]
    bad = [c for c, _ in out if c != 200]
    return [d * 1000 for _, d in out], bad


def slow():
    global failed
    alone, bad = latencies()
    print(f"slow: alone p50 {pct(alone, .5):.0f} ms, p99 {pct(alone, .99):.0f} ms")
    held, stop = [], threading.Event()
    for _ in range(300):
        held.append(socket.create_connection((HOST, PORT)))
    slow_socks = []
    for _ in range(200):
        s = socket.create_connection((HOST, PORT))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        slow_socks.append(s)

    def drip():
        while not stop.wait(1.0):
            for s in slow_socks:
                try:
                    s.sendall(b"X")
                except OSError:
                    pass

    threading.Thread(target=drip, daemon=True).start()
    time.sleep(0.5)
    busy, bad2 = latencies()
    stop.set()
    for s in held + slow_socks:
        s.close()
    print(f"slow: with 300 idle + 200 slow-header connections held: p50 {pct(busy, .5):.0f} ms, "
          f"p99 {pct(busy, .99):.0f} ms, refused {len(bad2)}")
    failed |= bool(bad or bad2)


def soak():
    global failed
    counts, lock, stop = {}, threading.Lock(), time.time() + A.seconds
    malformed = [b"{", b"[]", b'{"prompt": 5}', b'{"prompt": "a", "max_tokens": -1}', b'{"messages": "hi"}',
                 b'{"prompt": "a", "temperature": "hot"}', b"\xff\xfe", b'{"prompt": "a", "n": 1000}']

    def client(k):
        rnd = random.Random(k)
        while time.time() < stop:
            x = rnd.random()
            if x < 0.10:
                path = rnd.choice(["/v1/completions", "/v1/chat/completions"])
                r = request(path, raw=rnd.choice(malformed))
            elif x < 0.25:
                r = request("/v1/completions", {**NORMAL, "max_tokens": 64, "stream": True, "ignore_eos": True},
                            drop_after=rnd.randint(1, 200))
            elif x < 0.45:
                r = request("/v1/chat/completions", {"messages": [{"role": "user", "content": "Say hi"}],
                                                     "max_tokens": 16, "stream": rnd.random() < 0.5})
            elif x < 0.50:
                burst = [threading.Thread(target=lambda: record(request("/v1/completions", NORMAL)))
                         for _ in range(20)]
                [t.start() for t in burst]
                [t.join() for t in burst]
                continue
            else:
                r = request("/v1/completions", {**NORMAL, "max_tokens": rnd.randint(1, 32)})
            record(r)

    def record(r):
        with lock:
            counts[r[0]] = counts.get(r[0], 0) + 1

    start = rss()
    ts = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    end = rss()
    total = sum(counts.values())
    five = sum(v for k, v in counts.items() if not isinstance(k, int) or k >= 500)
    mem = f", RSS {start} -> {end} MB" if A.pid else ""
    print(f"soak {A.seconds:.0f} s: {total} requests, statuses {dict(sorted(counts.items(), key=str))}, "
          f"5xx/errors {five}{mem}")
    failed |= five > 0


for name in A.probes:
    {"burst": burst, "slow": slow, "soak": soak}[name]()
raise SystemExit(1 if failed else 0)
