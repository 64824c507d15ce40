"""Updates per second the aggregation server accepts and persists, with 50 concurrent holders, on SQLite and PostgreSQL.

The server runs as its own process (`fedprompt aggregator`, mutual TLS, rate limit raised so that it
measures the server and not the limiter); the holders are threads of this process, each with its own node
identity, certificate and channel (its own TLS connection, opened once and kept). Rounds run as a
synchronous federation runs them: the coordinator opens a round of `--clients` expected updates on the
current global prompt, naming the holders as its participants, every holder submits its update at the same
moment (a barrier; every update weighs the same), and the coordinator finalises the round, which stores
base + mean as the next global prompt (the base of the next round). An update counts once the server has
answered: by then it is committed (SQLite WAL with synchronous=FULL; PostgreSQL with whatever durability
the server was given, recorded in the output). At the end the store
is opened directly and the finalised rounds and their counts are checked against what was sent.

Reported per backend: updates/s end to end (opening and finalising included) and during the submission
phases only; p50/p99 latency of SubmitUpdate (client side, warm channel), OpenRound and FinaliseRound;
the concurrent TLS connection of all holders; the CPU of both processes; and a few rounds where every
holder opens a fresh channel per submission (handshake included) to show what TLS costs per call.

    python benchmarks/aggregator_throughput.py [--clients 50] [--rounds 100] [--shape 20 576]
        [--postgres URL | --no-postgres] [--pg-fsync off]
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
from common import emit

from fedprompt import certs
from fedprompt.flower_procs import free_port
from fedprompt.protocols.aggregator_client import AggregatorClient, AggregatorError
from fedprompt.protocols.records import ModelRef
from fedprompt.server.aggregation.store import open_store

ROOT = Path(__file__).resolve().parents[1]
# tests/pg.py finds the PostgreSQL binaries; its fixture's start logic is repeated below (a pytest fixture
# cannot be called outside pytest, and the benchmark wants fsync on by default, the test suite off).
sys.path.insert(0, str(ROOT / "tests"))
from pg import find_pg_bin  # noqa: E402

MODEL = ModelRef("tiny-llama", "d" * 64)
RATE = 1e6  # calls/s per identity: the limiter never refuses here
BURST = 1_000_000


def percentiles(xs: list[float]) -> dict:
    if not xs:
        return {}
    a = np.asarray(xs) * 1000
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "n": len(xs)}


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@contextmanager
def postgres(fsync: bool):
    """A throwaway PostgreSQL server (as tests/pg.py starts one): yields its URL, or None without binaries."""
    bindir = find_pg_bin()
    if bindir is None:
        yield None, "PostgreSQL binaries (initdb, pg_ctl) not found"
        return
    base = Path(tempfile.mkdtemp(prefix="fedprompt-bench-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(base)
            yield None, "running as root without a 'postgres' user"
            return
        os.chown(base, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    data = base / "data"

    def run(*args) -> None:
        subprocess.run([*prefix, *map(str, args)], capture_output=True, text=True, timeout=120, check=True)

    try:
        run(bindir / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C")
        (data / "pg_hba.conf").write_text("host all all 127.0.0.1/32 trust\n")
        port = free_port()
        durability = "" if fsync else "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {base} -c max_connections=100 {durability}"
        run(bindir / "pg_ctl", "-D", data, "-l", base / "server.log", "-w", "-t", "60", "-o", opts, "start")
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres", None
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                           capture_output=True, timeout=60)  # fmt: skip
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def aggregator(certs_dir: Path, store: str, log: Path):
    """`fedprompt aggregator` in its own process; yields (address, pid) once it answers health checks."""
    address = f"127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "fedprompt.cli", "aggregator", "--certs", str(certs_dir), "--store", store,
           "--listen", address, "--rate", str(RATE), "--burst", str(BURST), "--grace", "5"]  # fmt: skip
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    try:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + 60
        with AggregatorClient(address, certs_dir, "coordinator") as c:
            while True:
                try:
                    health_pb2_grpc.HealthStub(c.channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
                    break
                except grpc.RpcError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"the aggregator did not start: {log.read_text()[-2000:]}") from None
                    time.sleep(0.2)
        yield address, proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


class Holders:
    """One thread per holder; ``phase(fn)`` runs ``fn(i, client)`` in all of them at once and waits for all."""

    def __init__(self, clients: list[AggregatorClient]) -> None:
        self.clients = clients
        self.start = threading.Barrier(len(clients) + 1)
        self.end = threading.Barrier(len(clients) + 1)
        self.fn = None
        self.results: list = [None] * len(clients)
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(len(clients))]
        for t in self.threads:
            t.start()

    def _loop(self, i: int) -> None:
        while True:
            self.start.wait()
            if self.fn is None:
                return
            try:
                self.results[i] = self.fn(i, self.clients[i])
            except Exception as exc:  # counted by the caller
                self.results[i] = exc
            self.end.wait()

    def phase(self, fn) -> list:
        self.fn = fn
        self.start.wait(timeout=300)
        self.end.wait(timeout=300)
        return list(self.results)

    def stop(self) -> None:
        self.fn = None
        self.start.wait(timeout=60)


def timed(call):
    t = time.perf_counter()
    try:
        out = call()
    except AggregatorError as exc:
        return exc.code.name, time.perf_counter() - t
    return out, time.perf_counter() - t


def run_backend(store: str, certs_dir: Path, names: list[str], a, folder: Path) -> dict:
    shape = tuple(a.shape)
    rng = np.random.default_rng(0)
    deltas = [rng.normal(scale=1e-3, size=shape).astype(np.float32) for _ in names]
    errors: Counter = Counter()
    with aggregator(certs_dir, store, folder / "aggregator.log") as (address, pid), \
            AggregatorClient(address, certs_dir, "coordinator") as coord:  # fmt: skip
        head = coord.publish_version(task="bench", base_model=MODEL, embeddings=np.zeros(shape, np.float32))
        clients = [AggregatorClient(address, certs_dir, n) for n in names]
        holders = Holders(clients)
        try:
            t = time.perf_counter()
            ready = holders.phase(lambda i, c: grpc.channel_ready_future(c.channel).result(timeout=60))
            connect_s = time.perf_counter() - t
            assert all(x is None for x in ready), ready

            def one_round(submit) -> tuple[float, float, float, list[float]]:
                nonlocal head
                r, open_s = timed(lambda: coord.open_round(
                    task="bench", base_model=MODEL, shape=shape, expected_clients=len(names),
                    base_version_id=head.version_id, participants=names))  # fmt: skip
                t = time.perf_counter()
                out = holders.phase(lambda i, c: submit(i, c, r.round_id))
                submit_s = time.perf_counter() - t
                lat = []
                for x in out:
                    res, s = x if isinstance(x, tuple) else (f"{type(x).__name__}: {x}", 0.0)
                    if isinstance(res, int):
                        lat.append(s)
                    else:
                        errors[str(res)] += 1
                done, fin_s = timed(lambda: coord.finalise_round(r.round_id))
                if isinstance(done, str):
                    errors[f"FinaliseRound {done}"] += 1
                else:
                    assert done.contributors == len(lat), (done.contributors, len(lat))
                    head = done.version
                return open_s, fin_s, submit_s, lat

            def warm(i, c, round_id):
                return timed(lambda: c.submit_update(round_id=round_id, base_model=MODEL, delta=deltas[i]))

            def fresh(i, c, round_id):
                def call():
                    with AggregatorClient(address, certs_dir, names[i]) as new:
                        return new.submit_update(round_id=round_id, base_model=MODEL, delta=deltas[i])

                return timed(call)

            one_round(warm)  # warm-up: not counted
            cpu0, own0, t0 = proc_cpu_s(pid), time.process_time(), time.perf_counter()
            opens, fins, phases, lats = [], [], [], []
            for _ in range(a.rounds):
                o, f, s, lat = one_round(warm)
                opens.append(o)
                fins.append(f)
                phases.append(s)
                lats += lat
            wall = time.perf_counter() - t0
            server_cpu, own_cpu = proc_cpu_s(pid) - cpu0, time.process_time() - own0
            fresh_lat, fresh_phases = [], []
            for _ in range(a.fresh_rounds):
                _, _, s, lat = one_round(fresh)
                fresh_phases.append(s)
                fresh_lat += lat
        finally:
            holders.stop()
            for c in clients:
                c.close()
    with open_store(store) as s, s.transaction(write=False) as tx:  # what is persisted, read back directly
        rows = tx.execute("SELECT state, received, COUNT(*) FROM rounds GROUP BY state, received")
        leftover = tx.execute("SELECT COUNT(*) FROM updates")[0][0]
    accepted = len(lats)
    warm_p50 = float(np.percentile(lats, 50)) if lats else float("nan")
    fresh_p50 = float(np.percentile(fresh_lat, 50)) if fresh_lat else float("nan")
    return {
        "rounds": a.rounds,
        "updates_accepted": accepted,
        "updates_per_s_end_to_end": accepted / wall,
        "updates_per_s_submission_phases": accepted / sum(phases),
        "submit_latency_warm_channel": percentiles(lats),
        "open_round_latency": percentiles(opens),
        "finalise_round_latency": percentiles(fins),
        "round_wall_s_median": statistics.median(o + f + s for o, f, s in zip(opens, fins, phases, strict=True)),
        "server_cpu_s_per_update": server_cpu / accepted if accepted else None,
        "server_cpu_share_of_one_core": server_cpu / wall,
        "holders_process_cpu_share_of_one_core": own_cpu / wall,  # the 50 client threads, same machine
        "connect_all_holders_s": connect_s,
        "fresh_channel_rounds": a.fresh_rounds,
        "submit_latency_fresh_channel": percentiles(fresh_lat),
        "updates_per_s_fresh_channel_phases": len(fresh_lat) / sum(fresh_phases) if fresh_phases else None,
        "tls_handshake_share_of_fresh_call_p50 (1 - warm p50 / fresh p50)": (fresh_p50 - warm_p50) / fresh_p50
        if fresh_lat
        else None,
        "errors": dict(errors),
        "persisted_rounds_by_state_received": {f"{st}/{rec}": n for st, rec, n in rows},
        "updates_left_in_store": leftover,  # finalising deletes a round's updates: 0 expected
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=100, help="counted rounds per backend (after one warm-up round)")
    ap.add_argument("--fresh-rounds", type=int, default=4, help="rounds with a new channel per submission")
    ap.add_argument("--shape", type=int, nargs=2, default=[20, 576], help="prompt length x hidden size (float32)")
    ap.add_argument("--postgres", default=None, help="a postgresql:// URL (default: start a throwaway server)")
    ap.add_argument("--no-postgres", action="store_true")
    ap.add_argument("--pg-fsync", choices=["on", "off"], default="on", help="the throwaway server's fsync")
    a = ap.parse_args()
    names = [f"bench-{i:03d}" for i in range(a.clients)]
    backends: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        certs.create(tmp / "certs", nodes=names, hosts=["localhost"])
        certs_s = time.perf_counter() - t
        (tmp / "sqlite").mkdir()
        backends["sqlite"] = {"store": "SQLite file, WAL, synchronous=FULL"}
        backends["sqlite"] |= run_backend(str(tmp / "sqlite" / "registry.db"), tmp / "certs", names, a, tmp / "sqlite")
        print(backends["sqlite"], file=sys.stderr, flush=True)
        (tmp / "pg").mkdir()
        if a.no_postgres:
            backends["postgres"] = {"skipped": "--no-postgres"}
        elif a.postgres:
            backends["postgres"] = {"store": "given URL (schema created if missing; its durability is its own)"}
            backends["postgres"] |= run_backend(a.postgres, tmp / "certs", names, a, tmp / "pg")
        else:
            with postgres(fsync=a.pg_fsync == "on") as (url, why):
                if url is None:
                    backends["postgres"] = {"skipped": why}
                else:
                    durable = "fsync=on, synchronous_commit=on" if a.pg_fsync == "on" else "fsync=off (not durable)"
                    backends["postgres"] = {"store": f"throwaway local PostgreSQL, {durable}"}
                    backends["postgres"] |= run_backend(url, tmp / "certs", names, a, tmp / "pg")
    emit(
        {
            "benchmark": "aggregator_throughput",
            "clients": a.clients,
            "shape": a.shape,
            "update_bytes": int(np.prod(a.shape)) * 4,
            "server": f"`fedprompt aggregator` in its own process, mutual TLS, --rate {RATE:g} --burst {BURST}",
            "holders": "threads of the benchmark process, one identity and one channel each",
            "certs_create_s": certs_s,
            "backends": backends,
        }
    )


if __name__ == "__main__":
    main()
