#!/usr/bin/env python3
"""Measures the OpenHands agent-server (`agent-server`, REST API `/api/bash/execute_bash_command`,
which runs each command on its own: it has no persistent-session call) on the workloads of
benches/sidecar_bench.rs and prints one JSON object. Needs Python >= 3.12 (the package's
requirement); bench/run.sh builds that venv when a python3.12 is found.
"""

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

KEY = "bench-key"


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


def start(workdir: str):
    port = free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "agent-server")
    # No network here: litellm would try to fetch its model price list at start.
    env = dict(os.environ, SESSION_API_KEY=KEY, OH_ENABLE_VSCODE="0", LITELLM_LOCAL_MODEL_COST_MAP="True")
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [exe, "--host", "127.0.0.1", "--port", str(port)],
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    return proc, f"http://127.0.0.1:{port}", t0


async def wait_alive(client, base, t0, timeout=120):
    while time.perf_counter() - t0 < timeout:
        try:
            r = await client.get(base + "/alive", timeout=1)
            if r.status_code == 200:
                return time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.05)
    raise RuntimeError("agent-server did not come up")


async def run(client, base, command, timeout=60):
    r = await client.post(
        base + "/api/bash/execute_bash_command",
        json={"command": command, "timeout": timeout},
        headers={"X-Session-API-Key": KEY},
        timeout=timeout + 30,
    )
    r.raise_for_status()
    return r.json()


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--exec-n", type=int, default=200)
    ap.add_argument("--errors-n", type=int, default=500)
    args = ap.parse_args()
    out = {"peer": "OpenHands agent-server"}
    try:
        import importlib.metadata as md

        out["version"] = md.version("openhands-agent-server")
    except Exception:  # noqa: BLE001
        pass
    workdir = tempfile.mkdtemp(prefix="oh-bench-")
    async with httpx.AsyncClient() as client:
        proc, base, t0 = start(workdir)
        try:
            out["cold_start_ms"] = (await wait_alive(client, base, t0)) * 1000
            await asyncio.sleep(1.0)
            out["idle_rss_mb"] = rss_kb(proc.pid) / 1024
            for _ in range(5):
                await run(client, base, "echo hello")
            lat = []
            for _ in range(args.exec_n):
                t = time.perf_counter()
                await run(client, base, "/bin/true")
                lat.append(time.perf_counter() - t)
            out["exec_p50_ms"] = statistics.median(lat) * 1000

            per_client = 5

            async def loop():
                for _ in range(per_client):
                    await run(client, base, "sleep 0.1")

            t = time.perf_counter()
            await loop()
            one = per_client / (time.perf_counter() - t)
            t = time.perf_counter()
            await asyncio.gather(*[loop() for _ in range(8)])
            eight = 8 * per_client / (time.perf_counter() - t)
            out["throughput_ratio_8v1"] = eight / one

            t = time.perf_counter()
            try:
                r = await run(client, base, "head -c 10000000 /dev/zero | tr '\\0' x; echo", timeout=120)
                out["big_output_ms"] = (time.perf_counter() - t) * 1000
                out["big_output_bytes"] = len(r.get("stdout") or "")
            except Exception as e:  # noqa: BLE001
                out["big_output_ms"] = None
                out["big_output_error"] = repr(e)[:200]

            errors = 0
            for i in range(args.errors_n):
                try:
                    r = await run(client, base, f"echo {i}", timeout=30)
                    if (r.get("stdout") or "").strip() != str(i) or r.get("exit_code") != 0:
                        errors += 1
                except Exception:  # noqa: BLE001
                    errors += 1
            out["errors"] = errors
            out["errors_n"] = args.errors_n

            marker = "sleep 100.9292"
            try:
                await run(client, base, f"bash -c '{marker} & {marker}'", timeout=1)
            except Exception:  # noqa: BLE001
                pass
            await asyncio.sleep(1.5)
            left = procs_matching(marker)
            out["left_after_timeout"] = len(left)
            for pid in left:  # leftovers of our own marker command, by pid
                try:
                    os.kill(pid, 9)
                except OSError:
                    pass
        finally:
            os.killpg(proc.pid, 9)
            proc.wait()
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())
