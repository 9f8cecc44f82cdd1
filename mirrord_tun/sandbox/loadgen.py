"""HTTP POST load from the sandbox's client namespace, for the mirror tests and benchmark.

    loadgen URL COUNT CONCURRENCY MAX_BODY SEED

Bodies are random, 0..MAX_BODY bytes (the first is empty, the second MAX_BODY,
so both ends are always covered). Prints one JSON object: per request the
body's SHA-256 and length, the answer's status and text, and the latency, and
the run's wall time.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import json
import random
import sys
import time
import urllib.parse


def _post(url: urllib.parse.SplitResult, body: bytes) -> dict[str, object]:
    conn = http.client.HTTPConnection(url.hostname or "", url.port or 80, timeout=120)
    t0 = time.monotonic()
    try:
        conn.request("POST", url.path or "/", body=body, headers={"Content-Type": "application/octet-stream"})
        resp = conn.getresponse()
        answer = resp.read().decode(errors="replace")
        status = resp.status
    except OSError as e:
        answer, status = f"error: {e}", 0
    finally:
        conn.close()
    return dict(sha=hashlib.sha256(body).hexdigest(), len=len(body), status=status, answer=answer.strip(),
                latency=time.monotonic() - t0)


def run(url: str, count: int, concurrency: int, max_body: int, seed: int) -> dict[str, object]:
    rng = random.Random(seed)
    sizes = [0, max_body] + [rng.randint(0, max_body) for _ in range(count - 2)]
    parsed = urllib.parse.urlsplit(url)
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        # Each body from a generator of its own: a shared one would hand bodies out in the order the
        # threads happen to run, and two runs of the same seed would send different bodies.
        results = list(pool.map(lambda i: _post(parsed, random.Random(f"{seed}/{i}").randbytes(sizes[i])),
                                range(min(count, len(sizes)))))
    return dict(results=results, wall=time.monotonic() - t0)


def main() -> None:
    url, count, conc, max_body, seed = sys.argv[1], *map(int, sys.argv[2:6])
    json.dump(run(url, count, conc, max_body, seed), sys.stdout)


if __name__ == "__main__":
    main()
