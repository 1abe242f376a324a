"""How long this host takes to wake threads, alone and through the GIL (issue 5's Redis read).

Why: in the H200 traces of a resumed turn, the 24 reader threads of a 48 MiB Redis read started
one after another, 0.25-0.6 ms apart, so the last one began 6-15 ms after the first, while each
read its 2 MiB in ~0.5-1.5 ms. Two explanations fit: a thread holding the GIL for whole switch
intervals, or slow wake-ups of idle CPUs (every GIL hand-off to a sleeping thread is one). This
probe separates them, after an idle gap like a person's think time:
- `pingpong`: two threads handing an Event back and forth (one wake-up each way);
- `pool`: 24 tasks submitted to a warm ThreadPoolExecutor, each stamping when it starts;
- `pool_recv`: the same tasks each blocking in a socket `recv` that the main thread then
  satisfies at once (the reader threads' shape);
each with the CPUs idle and with `--spin` processes keeping that many CPUs busy meanwhile, and at
each switch interval given.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor


def spin(stop: multiprocessing.synchronize.Event) -> None:
    while not stop.is_set():
        pass


def pingpong(idle_s: float, reps: int) -> list[float]:
    a, b = threading.Event(), threading.Event()
    out: list[float] = []

    def echo() -> None:
        for _ in range(reps):
            a.wait()
            a.clear()
            b.set()

    t = threading.Thread(target=echo)
    t.start()
    for _ in range(reps):
        time.sleep(idle_s)
        t0 = time.perf_counter()
        a.set()
        b.wait()
        b.clear()
        out.append(1e6 * (time.perf_counter() - t0))
    t.join()
    return out


def pool_starts(pool: ThreadPoolExecutor, n: int, idle_s: float, reps: int) -> list[list[float]]:
    out = []
    for _ in range(reps):
        time.sleep(idle_s)
        starts = [0.0] * n

        def task(i: int, starts: list[float] = starts) -> None:
            starts[i] = time.perf_counter()

        t0 = time.perf_counter()
        futs = [pool.submit(task, i) for i in range(n)]
        for f in futs:
            f.result()
        out.append(sorted(1e6 * (s - t0) for s in starts))
    return out


def pool_recv(pool: ThreadPoolExecutor, n: int, idle_s: float, reps: int, nbytes: int) -> list[list[float]]:
    """Each task blocks in recv_into(MSG_WAITALL) of `nbytes`; the main thread sends every socket's
    bytes right after submitting (as the Redis servers answer). Stamps: when each recv returned."""
    pairs = [socket.socketpair() for _ in range(n)]
    payload = b"x" * nbytes
    bufs = [bytearray(nbytes) for _ in range(n)]
    out = []
    for _ in range(reps):
        time.sleep(idle_s)
        ends = [0.0] * n

        def task(i: int, ends: list[float] = ends) -> None:
            view = memoryview(bufs[i])
            got = 0
            while got < nbytes:
                got += pairs[i][1].recv_into(view[got:], nbytes - got, socket.MSG_WAITALL)
            ends[i] = time.perf_counter()

        t0 = time.perf_counter()
        futs = [pool.submit(task, i) for i in range(n)]
        senders = [threading.Thread(target=pairs[i][0].sendall, args=(payload,)) for i in range(n)]
        for s in senders:
            s.start()
        for f in futs:
            f.result()
        for s in senders:
            s.join()
        out.append(sorted(1e6 * (e - t0) for e in ends))
    for a, b in pairs:
        a.close()
        b.close()
    return out


def summary(runs: list[list[float]]) -> dict[str, float]:
    return {"first_us": statistics.median(r[0] for r in runs),
            "median_us": statistics.median(r[len(r) // 2] for r in runs),
            "last_us": statistics.median(r[-1] for r in runs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--idle-ms", type=float, nargs="+", default=[0.0, 50.0])
    ap.add_argument("--switch-ms", type=float, nargs="+", default=[0.5, 0.1])
    ap.add_argument("--spin", type=int, nargs="+", default=[0, 8], help="busy processes meanwhile (0: CPUs idle)")
    ap.add_argument("--threads", type=int, default=24)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--recv-bytes", type=int, default=2 << 20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    pool = ThreadPoolExecutor(4 * args.threads)
    pool_starts(pool, args.threads, 0, 2)  # its threads exist from here on
    rows = []
    for spinners in args.spin:
        stop = multiprocessing.Event()
        procs = [multiprocessing.Process(target=spin, args=(stop,), daemon=True) for _ in range(spinners)]
        for p in procs:
            p.start()
        time.sleep(0.2)
        for switch_ms in args.switch_ms:
            sys.setswitchinterval(switch_ms / 1e3)
            for idle_ms in args.idle_ms:
                pp = pingpong(idle_ms / 1e3, args.reps)
                row = {"spin": spinners, "switch_ms": switch_ms, "idle_ms": idle_ms,
                       "pingpong_us": statistics.median(pp),
                       "pool": summary(pool_starts(pool, args.threads, idle_ms / 1e3, args.reps)),
                       "pool_recv": summary(pool_recv(pool, args.threads, idle_ms / 1e3, args.reps, args.recv_bytes))}
                rows.append(row)
                print(f"spin {spinners:2d} switch {switch_ms:.2f} ms idle {idle_ms:4.0f} ms: ping-pong "
                      f"{row['pingpong_us']:6.0f} us | {args.threads} task starts first/median/last "
                      + "/".join(f"{v:.0f}" for v in row["pool"].values())
                      + f" us | {args.threads} recv of {args.recv_bytes >> 10} KiB ends "
                      + "/".join(f"{v:.0f}" for v in row["pool_recv"].values()) + " us", flush=True)
        stop.set()
        for p in procs:
            p.join()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"benchmark": "probe_wakeup", "cpus": os.cpu_count(), "python": sys.version.split()[0],
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
