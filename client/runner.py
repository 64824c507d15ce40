"""fedprompt's own ClientApp runner: the only code that answers the coordinator on a data holder's machine.

A stock SuperNode (``--isolation subprocess``) starts a new ``flwr-clientapp`` process for every message, and
that process imports the ClientApp named by the run's app bundle, from the bundle's folder first: whoever submits
a run chooses the code that runs next to the holder's data. ``fedprompt client`` instead starts its SuperNode in
``--isolation process`` and runs this runner in its own process, which:

1. claims each task from the SuperNode's local Runtime API (loopback; the claim is signed with a secret in a
   0600 file of the holder's state folder, so no other local process can take a task; every later call carries
   the task's token);
2. pulls the message, the run and its bundle, and compares the bundle's SHA-256 with the bundle of the Flower App
   this fedprompt version ships (built the same deterministic way ``flwr run`` builds it). A run whose bundle
   differs is refused with an error reply; the bundle is never unpacked or imported either way;
3. hands the message to the holder's service (``client/app.answer``) in this process, where the model and the
   data are already loaded (no process start or model load per message), heartbeating while it trains;
4. pushes exactly one reply and the task's end: a SuperNode whose message is never answered blocks every run.

Flower's own helpers that raise SIGINT in the calling process (its task heartbeat and its HTTP retry invoker)
suit a one-shot ``flwr-clientapp`` process, not a daemon: this runner uses neither.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from flwr.app import Error, Message
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest, SendTaskHeartbeatRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from fedprompt.client.app import REFUSED, answer

log = logging.getLogger("fedprompt.client")

SECRET_FILE = "superexec.secret"
ACQUIRE_METHOD = "/flwr.proto.Runtime/AcquireTask"
POLL_S = 0.2


def installed_app_sha256() -> str:
    """The SHA-256 of the Flower App bundle this fedprompt version ships, as ``flwr run`` would build it."""
    from flwr.cli.build import build_fab_from_disk

    from fedprompt.flower_procs import app_dir

    return hashlib.sha256(build_fab_from_disk(app_dir())).hexdigest()


def write_secret(state_dir: Path) -> Path:
    """A fresh secret for this start of the daemon (mode 0600): the SuperNode and the runner share it."""
    path = state_dir / SECRET_FILE
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secrets.token_bytes(32))
    os.replace(tmp, path)
    return path


class ClientAppRunner:
    """Answers the SuperNode's ClientApp tasks one at a time (the SuperNode has at most one pending)."""

    def __init__(
        self,
        service,
        address: str,
        secret_file: Path,
        *,
        app_sha256: str,
        answer_fn: Callable = answer,
        poll_s: float = POLL_S,
    ) -> None:
        self.service, self.address, self.app_sha256 = service, address, app_sha256
        self.answer_fn, self.poll_s = answer_fn, poll_s
        self._secret = secret_file.read_bytes()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.answered = 0
        self.refused_bundles = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> threading.Thread:
        self._thread = threading.Thread(target=self._loop, name="clientapp-runner", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout: float = 10.0) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _claim_client(self) -> RuntimeHttpClient:
        interceptors = [
            RuntimeVersionHttpInterceptor(component_name="SuperExec"),
            SuperExecAuthHttpInterceptor(master_secret=self._secret, protected_methods={ACQUIRE_METHOD}),
        ]
        return RuntimeHttpClient.from_server_address(self.address, True, None, interceptors)

    def _task_client(self, token: str) -> RuntimeHttpClient:
        interceptors = [
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(token),
        ]
        return RuntimeHttpClient.from_server_address(self.address, True, None, interceptors)

    def _loop(self) -> None:
        claim = self._claim_client()
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        down_since: float | None = None
        try:
            while not self._stopped.is_set():
                try:
                    res = claim.AcquireTask(request)
                    down_since = None
                except httpx.HTTPError as exc:  # the SuperNode is (re)starting, or refused the claim
                    if down_since is None:
                        down_since = time.monotonic()
                        log.debug("the SuperNode's runtime API did not answer: %s", exc)
                    self._stopped.wait(1.0)
                    continue
                if res.HasField("task") and res.token:
                    self._task(res.token)
                    continue
                self._stopped.wait(self.poll_s)
        finally:
            claim.close()

    # ------------------------------------------------------------------ one task

    def _task(self, token: str) -> None:
        client = self._task_client(token)
        heartbeat = HeartbeatSender(_heartbeat(client))
        heartbeat.start()
        message = context = None
        replied = False
        try:
            message, context, run, fab = pull_task_input(client)
            reply = self._reply(message, run, fab)
            push_message(client, reply, context)
            replied = True
            push_task_output(client, context, SubStatus.FAILED if reply.has_error() else SubStatus.COMPLETED, "")
        except Exception as exc:  # the runner must outlive anything a task throws at it
            log.exception("a ClientApp task failed")
            if message is not None and context is not None and not replied:
                try:  # an unanswered message blocks the SuperNode for every run: always reply
                    err = Error(
                        code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__} on the holder"
                    )
                    push_message(client, Message(err, reply_to=message), context)
                except Exception:
                    log.exception("could not push the error reply")
            if context is not None:
                try:
                    push_task_output(client, context, SubStatus.FAILED, type(exc).__name__)
                except Exception:
                    log.exception("could not end the task")
        finally:
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()

    def _reply(self, message: Message, run, fab) -> Message:
        if fab.hash_str != self.app_sha256 or hashlib.sha256(fab.content).hexdigest() != self.app_sha256:
            self.refused_bundles += 1
            reason = (
                "refused by the holder (rule installed_app): this holder runs only the Flower App of its own "
                f"fedprompt version (bundle sha256 {self.app_sha256[:16]}); run {run.run_id} brings bundle "
                f"{fab.hash_str[:16]} ({run.fab_id or 'no id'})"
            )
            log.warning("%s", reason)
            return Message(Error(code=REFUSED, reason=reason), reply_to=message)
        reply = self.answer_fn(self.service, message)
        self.answered += 1
        return reply


def _heartbeat(client: RuntimeHttpClient) -> Callable[[], bool]:
    """Flower's task heartbeat without its SIGINT: True when sent (or when retrying cannot help)."""
    request = SendTaskHeartbeatRequest()

    def send() -> bool:
        try:
            client.SendTaskHeartbeat(request)
        except httpx.TransportError:
            return False  # HeartbeatSender retries with back-off
        except httpx.HTTPStatusError as exc:
            return exc.response.status_code not in (503, 504)
        return True

    return send
