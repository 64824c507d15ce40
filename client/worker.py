"""The holder's long-lived worker: keeps the frozen model and the data loaded between Flower messages.

Flower 1.41 starts a fresh ClientApp process for every message (in both isolation modes), so a ClientApp
that loaded the model itself would pay the load every round (``benchmarks/round_overhead.py`` measures
it). ``fedprompt client`` therefore hosts one :class:`Holder` in its own process and the ClientApp only
forwards each message to it over a Unix socket (mode 0700 folder, HMAC challenge with a random key
from a 0600 file). Frames are a JSON header and a ``.npy`` array (``allow_pickle=False``): no pickle
crosses the socket.

Secure aggregation: when a round's settings ask for it, the update stays here (``_pending``) and the
coordinator relays the SecAgg+ stages (kind ``secagg``) to a :class:`SecAggClient` that masks it; the update
itself never leaves this process. The masking secrets live only in memory and are dropped when the round's
protocol ends or the next round starts.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import os
import secrets
import shutil
import socket
import tempfile
import threading
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path

import numpy as np

from fedprompt.errors import BudgetExceededError, FedPromptError

log = logging.getLogger("fedprompt.client")

KINDS = ("train", "evaluate", "secagg", "dpopt_generate", "dpopt_score")
_NO_PROMPT = ("secagg", "dpopt_generate", "dpopt_score")  # requests that carry no prompt array


def _npy(arr: np.ndarray | None) -> bytes:
    if arr is None:
        return b""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def _from_npy(data: bytes) -> np.ndarray | None:
    return np.load(io.BytesIO(data), allow_pickle=False) if data else None


def send_frames(conn: Connection, header: dict, arr: np.ndarray | None) -> None:
    conn.send_bytes(json.dumps(header).encode())
    conn.send_bytes(_npy(arr))


def recv_frames(conn: Connection) -> tuple[dict, np.ndarray | None]:
    header = json.loads(conn.recv_bytes().decode())
    if not isinstance(header, dict):
        raise ValueError("malformed frame header")
    return header, _from_npy(conn.recv_bytes())


def request(address: str, key_file: str, kind: str, prompt: np.ndarray, config: dict) -> tuple[dict, np.ndarray | None]:
    """Send one message to the worker at ``address``; returns its reply header and array."""
    key = Path(key_file).read_bytes()
    with Client(address, family="AF_UNIX", authkey=key) as conn:
        send_frames(conn, {"kind": kind, "config": config}, prompt)
        return recv_frames(conn)


class HolderService:
    """Answers train/evaluate requests for one data holder from a :class:`Holder` loaded on first use."""

    def __init__(
        self,
        *,
        data: str,
        state_dir: str | Path,
        name: str,
        device: str = "auto",
        precision: str = "auto",
        allowed_models: set[str] | None = None,
        signing_key: str | Path | None = None,
    ) -> None:
        self.data, self.state_dir, self.name = data, Path(state_dir), name
        self.device, self.precision = device, precision
        self.allowed_models = allowed_models
        self.signing_key = Path(signing_key) if signing_key else None  # the node key signs SecAgg key adverts
        self._holder = None
        self._holder_key: tuple | None = None
        self._pending: dict[tuple[str, int], np.ndarray] = {}  # (run, round) -> update awaiting secure aggregation
        self._secagg: dict[tuple[str, int], object] = {}  # (run, round) -> its SecAggClient
        from fedprompt.client.dpopt_holder import DPOPTJobs

        self._dpopt = DPOPTJobs()  # federated DP-OPT runs between their generation and their scoring

    # ------------------------------------------------------------------ requests

    def holder(self, config: dict):
        from fedprompt.client.trainer import Holder  # torch and transformers load here, once
        from fedprompt.rounds import TaskSpec
        from fedprompt.runtime import Runtime
        from fedprompt.zoo import known_names

        task = TaskSpec.from_config(config)
        # by default only the zoo's names and the models this holder registered itself (a student from the
        # provider): a coordinator must not make a holder open paths of its choosing
        allowed = self.allowed_models if self.allowed_models is not None else known_names()
        if task.model not in allowed:
            raise FedPromptError(
                f"the coordinator asked for model {task.model!r}; this holder allows {sorted(allowed)}"
            )
        key = (task, int(config.get("max_length", 128)))
        if self._holder_key != key:
            self._holder = None  # free the previous task's model before loading the next
            self._holder = Holder(
                data=self.data,
                state_dir=self.state_dir,
                name=self.name,
                model=task.model,
                task=task,
                runtime=Runtime.create(self.device, self.precision),
                max_length=key[1],
            )
            self._holder_key = key
        return self._holder

    def handle(self, header: dict, prompt: np.ndarray | None) -> tuple[dict, np.ndarray | None]:
        import torch

        from fedprompt.rounds import LocalSettings

        kind, config = header.get("kind"), header.get("config")
        if kind not in KINDS or not isinstance(config, dict) or (prompt is None) != (kind in _NO_PROMPT):
            return {"ok": False, "code": "refused", "reason": f"malformed request (kind={kind!r})"}, None
        try:
            if kind == "secagg":
                return self._secagg_step(config), None
            holder = self.holder(config)
            if kind in ("dpopt_generate", "dpopt_score"):
                job = self._dpopt.generate if kind == "dpopt_generate" else self._dpopt.score
                return {"ok": True, "holder": self.name, **job(holder, config)}, None
            weight = torch.from_numpy(np.array(prompt, dtype=np.float32))
            if kind == "train":
                settings = LocalSettings.from_config(config)
                outcome = holder.train_round(weight, settings)
                metrics = {"num_examples": outcome.num_examples, **outcome.metrics}
                if settings.secure_aggregation:
                    self._pending = {(settings.run_id, settings.server_round): outcome.delta.numpy().reshape(-1)}
                    self._secagg.clear()
                    return {"ok": True, "holder": self.name, "metrics": metrics, "secure": True}, None
                return {"ok": True, "holder": self.name, "metrics": metrics}, outcome.delta.numpy()
            accuracy, n = holder.evaluate(weight)
            return {"ok": True, "holder": self.name, "metrics": {"accuracy": accuracy, "num_examples": n}}, None
        except BudgetExceededError as exc:
            log.warning("refused: %s", exc)
            return {"ok": False, "code": "budget", "reason": str(exc)}, None
        except (FedPromptError, ValueError) as exc:
            log.warning("refused: %s", exc)
            return {"ok": False, "code": "refused", "reason": f"{type(exc).__name__}: {exc}"}, None
        except Exception as exc:  # reported to the coordinator as a failed reply; the daemon keeps serving
            log.exception("request failed")
            return {"ok": False, "code": "error", "reason": f"{type(exc).__name__}: {exc}"}, None

    def _secagg_step(self, config: dict) -> dict:
        from cryptography.hazmat.primitives.serialization import load_ssh_private_key

        from fedprompt.protocols import secagg_pb2
        from fedprompt.protocols.secagg_client import SecAggClient

        key = (str(config["run_id"]), int(config["server_round"]))
        msg = secagg_pb2.SecAggMessage.FromString(base64.b64decode(config["message"]))
        stage = msg.WhichOneof("body")
        if stage == "setup":
            update = self._pending.get(key)
            if update is None:
                raise FedPromptError(f"no update of run {key[0]} round {key[1]} is waiting for secure aggregation")
            if msg.setup.vector_length != update.size:
                n = msg.setup.vector_length
                raise FedPromptError(f"secure aggregation of {n} values; the update has {update.size}")
            signer = load_ssh_private_key(self.signing_key.read_bytes(), None) if self.signing_key else None
            self._secagg[key] = SecAggClient(msg.setup, update, signing_key=signer)
        client = self._secagg.get(key)
        if client is None:
            raise FedPromptError(f"secure aggregation of run {key[0]} round {key[1]} has not started here")
        reply = client.handle(msg)
        if stage == "unmask_request":  # the protocol's last message from this holder: forget the secrets
            self._secagg.pop(key, None)
            self._pending.pop(key, None)
        encoded = base64.b64encode(reply.SerializeToString()).decode()
        return {"ok": True, "holder": self.name, "metrics": {}, "message": encoded}


# sun_path holds 108 bytes on Linux; leave room for the socket's own name
_MAX_SOCKET_DIR = 90


def _socket_dir() -> Path:
    """A fresh 0700 folder for the worker's socket: under $TMPDIR, or /tmp when $TMPDIR is too long a path
    for a Unix socket (a deeply nested TMPDIR makes bind() fail with 'AF_UNIX path too long')."""
    for parent in (None, "/tmp"):
        folder = Path(tempfile.mkdtemp(prefix="fedprompt-worker-", dir=parent))
        if len(str(folder)) <= _MAX_SOCKET_DIR:
            return folder
        folder.rmdir()
    raise FedPromptError("no temporary folder short enough for a Unix socket; set TMPDIR to a short path")


class HolderWorker:
    """Serves a :class:`HolderService` on a Unix socket, one request at a time (training is serialised)."""

    def __init__(self, service: HolderService) -> None:
        self.service = service
        self._dir = _socket_dir()  # mode 0700
        self.address = str(self._dir / "worker.sock")
        self.key_file = str(self._dir / "worker.key")
        fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
        self._listener = Listener(self.address, family="AF_UNIX", authkey=Path(self.key_file).read_bytes())
        self._stopped = threading.Event()
        self.served = 0

    def serve_forever(self) -> None:
        while not self._stopped.is_set():
            try:
                conn = self._listener.accept()
            except (OSError, EOFError, AuthenticationError):  # stop()'s wake-up, or a failed key challenge
                if self._stopped.is_set():
                    return
                log.warning("a connection failed authentication and was dropped")
                continue
            if self._stopped.is_set():
                conn.close()
                return
            with conn:
                try:
                    header, prompt = recv_frames(conn)
                    reply, arr = self.service.handle(header, prompt)
                    send_frames(conn, reply, arr)
                    self.served += 1
                except (EOFError, OSError, ValueError) as exc:
                    log.warning("dropped a broken request: %s", exc)

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.serve_forever, name="holder-worker", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        self._stopped.set()
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
            s.connect(self.address)  # wakes the accept() blocked in serve_forever
        self._listener.close()
        shutil.rmtree(self._dir, ignore_errors=True)
