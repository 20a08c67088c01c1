#!/usr/bin/env python3
"""Measures SWE-ReX (its own server `swerex-remote` and its own client `RemoteRuntime`) on
the same workloads as benches/sidecar_bench.rs, and prints one JSON object on stdout.

Run by bench/run.sh through the Rust bench; usable alone:
    python swerex_bench.py --errors-n 500
"""

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def procs_matching(needle: str) -> list:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmd:
            found.append(int(pid))
    return found


def start_server(workdir: str):
    from swerex.runtime.remote import RemoteRuntime

    port = free_port()
    token = "bench-token"
    exe = os.path.join(os.path.dirname(sys.executable), "swerex-remote")
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [exe, "--host", "127.0.0.1", "--port", str(port), "--auth-token", token],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    rt = RemoteRuntime(host="http://127.0.0.1", port=port, auth_token=token, timeout=60)
    return proc, rt, t0


async def wait_alive(rt, t0):
    while True:
        try:
            r = await rt.is_alive(timeout=1)
            if r.is_alive:
                return time.perf_counter() - t0
        except Exception:
            pass
        await asyncio.sleep(0.01)


def p50(xs):
    return statistics.median(xs)


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--session-n", type=int, default=200)
    ap.add_argument("--exec-n", type=int, default=200)
    ap.add_argument("--errors-n", type=int, default=500)
    ap.add_argument("--cold-n", type=int, default=3)
    args = ap.parse_args()

    from swerex.runtime.abstract import BashAction, Command, CreateBashSessionRequest

    out = {"peer": "SWE-ReX", "version": None}
    try:
        import importlib.metadata as md

        out["version"] = md.version("swe-rex")
    except Exception:
        pass
    workdir = tempfile.mkdtemp(prefix="swerex-bench-")

    # Cold start: process start until is_alive answers.
    colds = []
    for _ in range(args.cold_n):
        proc, rt, t0 = start_server(workdir)
        colds.append(await wait_alive(rt, t0))
        os.killpg(proc.pid, 9)
        proc.wait()
    out["cold_start_ms"] = p50(colds) * 1000

    proc, rt, t0 = start_server(workdir)
    await wait_alive(rt, t0)
    await asyncio.sleep(1.0)
    out["idle_rss_mb"] = rss_kb(proc.pid) / 1024

    await rt.create_session(CreateBashSessionRequest(session="s"))
    for _ in range(10):
        await rt.run_in_session(BashAction(command="echo hello", session="s", check="silent"))
    lat = []
    for _ in range(args.session_n):
        t = time.perf_counter()
        await rt.run_in_session(BashAction(command="echo hello", session="s", check="silent"))
        lat.append(time.perf_counter() - t)
    out["session_p50_ms"] = p50(lat) * 1000

    lat = []
    for _ in range(args.exec_n):
        t = time.perf_counter()
        await rt.execute(Command(command=["/bin/true"], shell=False))
        lat.append(time.perf_counter() - t)
    out["exec_p50_ms"] = p50(lat) * 1000

    # Throughput on `sleep 0.1`: 1 client vs 8 concurrent clients, one-off commands.
    per_client = 5

    async def client_loop():
        for _ in range(per_client):
            await rt.execute(Command(command=["sleep", "0.1"], shell=False))

    t = time.perf_counter()
    await client_loop()
    one = per_client / (time.perf_counter() - t)
    t = time.perf_counter()
    await asyncio.gather(*[client_loop() for _ in range(8)])
    eight = 8 * per_client / (time.perf_counter() - t)
    out["throughput_ratio_8v1"] = eight / one

    # 10 MB of output in a session (SWE-ReX has no cap); give up after 120 s.
    t = time.perf_counter()
    try:
        r = await asyncio.wait_for(
            rt.run_in_session(
                BashAction(command="head -c 10000000 /dev/zero | tr '\\0' x; echo", session="s", timeout=120, check="silent")
            ),
            timeout=125,
        )
        out["big_output_ms"] = (time.perf_counter() - t) * 1000
        out["big_output_bytes"] = len(r.output)
    except Exception as e:  # noqa: BLE001
        out["big_output_ms"] = None
        out["big_output_error"] = repr(e)[:200]

    # Errors: session commands whose output or exit code is wrong, or that raise.
    await rt.create_session(CreateBashSessionRequest(session="e"))
    errors = 0
    for i in range(args.errors_n):
        try:
            r = await rt.run_in_session(BashAction(command=f"echo {i}", session="e", check="silent", timeout=30))
            if r.output.strip() != str(i) or r.exit_code != 0:
                errors += 1
        except Exception:  # noqa: BLE001
            errors += 1
    out["errors"] = errors
    out["errors_n"] = args.errors_n

    # Timeouts: are the command's children left running?
    marker = "sleep 100.9191"
    await rt.create_session(CreateBashSessionRequest(session="t"))
    try:
        await rt.run_in_session(BashAction(command=f"bash -c '{marker} & {marker}'", session="t", timeout=0.5, check="silent"))
    except Exception:  # noqa: BLE001
        pass
    await asyncio.sleep(1.0)
    left = procs_matching(marker)
    out["left_after_timeout"] = len(left)
    for pid in left:  # the leftovers of our own marker command, by pid
        try:
            os.kill(pid, 9)
        except OSError:
            pass

    os.killpg(proc.pid, 9)
    proc.wait()
    shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())
