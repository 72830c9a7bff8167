"""The server's life across its processes: serving, draining, stopping; engine liveness; who acts on signals.

The processes: the main one (LitServe's `run`, the signal handlers, the drain), the HTTP processes (forked;
uvicorn), the engine worker (spawned) and LitServe's manager (forked). Ctrl-C, `systemctl stop` or
`kill -- -PGID` send a signal to all of them at once; only the main process acts on it. The others go on
until the main process says STOPPING, so a drain is the same whichever processes got the signal:

    SERVING --signal--> DRAINING (new requests: 503; in flight: finish, up to --drain-timeout)
            --drained or timed out--> STOPPING (what is left gets an error; then the processes exit)

The engine worker writes a heartbeat from a thread of its own; an HTTP process that sees it stop fails the
requests it has in flight at once. LitServe then starts a new worker; too many restarts end the server
with exit code 1, so a supervisor (Docker, systemd, Kubernetes) can see it. So do the deaths LitServe would
not notice: of the worker while it first loads the model (LitServe waits for it forever) and of an HTTP
process (nothing restarts it, and the socket it served stays bound, so connections hang).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections import deque

log = logging.getLogger("server")

SERVING, DRAINING, STOPPING = 0, 1, 2
HEARTBEAT_SECONDS = 0.2
ENGINE_DEAD_AFTER = 1.5  # seconds without a heartbeat; far above the beat, far below a client's patience
# Seconds one pass of the engine loop may take before the engine counts as hung (a CUDA op that never
# returns): the heartbeat comes from a thread of its own and would go on. Far above any one iteration (a
# prefill layer, a decode step), so only a hang reaches it.
ENGINE_STUCK_AFTER = 300.0
STOP_GRACE = 2.0  # seconds between STOPPING (errors sent) and the processes being told to exit
UVICORN_GRACE = 2  # seconds uvicorn waits for connections when it exits (LitServe's default is 30)
WORKER_JOIN = 5  # LitServe waits this long for the worker after its SIGTERM (ours exits at once)
# Signal to exit is at most --drain-timeout plus this; a platform's grace period must cover both. LitServe
# stops its HTTP processes one after another: each --api-servers process past the first adds UVICORN_GRACE.
SHUTDOWN_OVERHEAD = STOP_GRACE + UVICORN_GRACE + WORKER_JOIN + 1
SAME_SIGNAL_WITHIN = 1.0  # seconds: a wrapper (timeout, tini -g) forwards the group's signal a second time
MAX_ENGINE_RESTARTS = 3  # within RESTART_WINDOW; one more and the server exits 1
RESTART_WINDOW = 300.0


class SharedState:
    """What every process of the server sees: the phase, requests in flight, the engine's heartbeat."""

    def __init__(self):
        ctx = mp.get_context("spawn")  # the worker is spawned: fork-made locks cannot be sent to it
        self._phase = ctx.RawValue("i", SERVING)
        self._inflight = ctx.Value("i", 0)
        self._heartbeat = ctx.RawValue("d", 0.0)  # time.monotonic() is one clock for all processes (Linux)
        self._engine_pid = ctx.RawValue("i", 0)
        self._loop_beat = ctx.RawValue("d", 0.0)  # the engine loop's last pass; 0 until it first runs

    # phase
    @property
    def phase(self) -> int:
        return self._phase.value

    @phase.setter
    def phase(self, value: int) -> None:
        self._phase.value = max(self._phase.value, value)  # phases only move forward

    @property
    def draining(self) -> bool:
        return self.phase >= DRAINING

    @property
    def stopping(self) -> bool:
        return self.phase == STOPPING

    # requests in flight, in all HTTP processes
    @property
    def inflight(self) -> int:
        return self._inflight.value

    def add_inflight(self, count: int) -> None:
        with self._inflight.get_lock():
            self._inflight.value += count

    # the engine
    @property
    def engine_pid(self) -> int:
        return self._engine_pid.value

    def engine_alive(self) -> bool:
        now = time.monotonic()
        loop = self._loop_beat.value
        return (self._engine_pid.value != 0 and now - self._heartbeat.value < ENGINE_DEAD_AFTER
                and (loop == 0.0 or now - loop < ENGINE_STUCK_AFTER))

    def loop_beat(self) -> None:
        """In the engine worker, at each pass of its loop."""
        self._loop_beat.value = time.monotonic()

    def start_heartbeat(self) -> None:
        """In the engine worker, first thing: say who the engine is now, and keep saying it is alive."""
        previous = self._engine_pid.value
        if previous and previous != os.getpid():
            _forget_metrics_of(previous)
        self._heartbeat.value = time.monotonic()
        self._loop_beat.value = 0.0  # a new worker loads (minutes, with an export) before its loop runs
        self._engine_pid.value = os.getpid()

        def beat():
            while True:
                self._heartbeat.value = time.monotonic()
                time.sleep(HEARTBEAT_SECONDS)

        threading.Thread(target=beat, name="engine-heartbeat", daemon=True).start()


def _forget_metrics_of(pid: int) -> None:
    """A dead worker's live gauges (running, waiting) must not count after its restart."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


# ---- signals in the child processes ----------------------------------------------------------------------
def worker_signals(shared: SharedState) -> None:
    """In the engine worker: a signal to the whole group is not the worker's to act on; LitServe's own
    SIGTERM at the end of the shutdown (phase STOPPING) ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def on_sigterm(signum, frame):
        if shared.stopping:
            os._exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)


def http_signals(shared: SharedState) -> None:
    """In an HTTP process (from its startup, after uvicorn installed its handlers): uvicorn would stop
    accepting connections at the first signal; it may only once the main process says STOPPING, so that a
    draining server keeps answering 503 instead of refusing connections."""
    uvicorn_exit = signal.getsignal(signal.SIGTERM)

    def on_signal(signum, frame):
        if shared.stopping and callable(uvicorn_exit):
            uvicorn_exit(signum, frame)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)


# ---- the main process -------------------------------------------------------------------------------------
class Supervisor:
    """The main process's part: signals become a drain, the engine's restarts are watched, the exit code
    says whether the server ended as asked (0) or because its engine kept dying (1)."""

    def __init__(self, server, shared: SharedState, drain_timeout: float):
        self.server = server  # the LitServer
        self.shared = shared
        self.drain_timeout = drain_timeout
        self.exit_code = 0
        self._pid = os.getpid()
        self._hurry = threading.Event()
        self._stopping = threading.Lock()
        self._first_signal = 0.0
        self._ready = False  # a worker has been ready once (from then on LitServe watches and restarts workers)
        self._restarts: deque[float] = deque()  # when the engine worker was restarted, within RESTART_WINDOW
        self._engine_seen: int | None = None  # the engine worker's pid when last looked at

    def install(self) -> None:
        """Before LitServe forks: its manager inherits these handlers, and (not being the main process)
        ignores the signals, so a signal to the group cannot take the queues away mid-drain."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        threading.Thread(target=self._watch, name="process-watch", daemon=True).start()

    def _on_signal(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            return  # a forked child that inherited this handler
        if self.shared.phase == SERVING:
            self.shared.phase = DRAINING
            self._first_signal = time.monotonic()
            log.info("signal %d: draining %d request(s), up to %.0f s", signum, self.shared.inflight,
                     self.drain_timeout)
            threading.Thread(target=self._drain, name="drain", daemon=True).start()
        elif time.monotonic() - self._first_signal > SAME_SIGNAL_WITHIN:
            log.info("signal %d again: ending the requests in flight now", signum)
            self._hurry.set()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.drain_timeout
        while self.shared.inflight > 0 and time.monotonic() < deadline and not self._hurry.is_set():
            time.sleep(0.05)
        self.stop(f"drained ({self.shared.inflight} request(s) left)")

    def stop(self, reason: str) -> None:
        """STOPPING: the HTTP processes end what is left with an error event; then LitServe's shutdown."""
        if not self._stopping.acquire(blocking=False):
            return
        self.shared.phase = STOPPING
        log.info("%s; stopping", reason)
        deadline = time.monotonic() + STOP_GRACE
        while self.shared.inflight > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        while self.server._shutdown_event is None:  # run() has not made its manager yet
            time.sleep(0.05)
        self.server._shutdown_event.set()  # LitServe's own shutdown: uvicorn, the worker, the manager
        if not self._ready:  # LitServe waits for the loading worker and looks at no event: end the load
            for worker in self._workers():
                worker.terminate()
                worker.join(WORKER_JOIN)
            self._fail_startup()

    # ---- watching the processes -------------------------------------------------------------------------------
    def _workers(self) -> list:
        return list(getattr(self.server, "inference_workers", None) or [])

    def _startup_status(self) -> dict:
        return getattr(self.server, "workers_setup_status", None) or {}

    def _fail_startup(self) -> None:
        """What a worker reports when its setup raised: LitServe's start-up wait then raises and `run` ends."""
        from litserve.utils import WorkerSetupStatus

        status = self._startup_status()
        for key, value in list(status.items()):
            if value == WorkerSetupStatus.STARTING:
                status[key] = WorkerSetupStatus.ERROR

    def _watch_startup(self) -> bool:
        """Whether start-up is over for this watch: a worker died loading (its status is made an error, so
        LitServe's wait ends). A worker that reported its own error is LitServe's to end."""
        from litserve.utils import WorkerSetupStatus

        status = list(self._startup_status().values())
        if any(value == WorkerSetupStatus.READY for value in status):
            self._ready = True
            return False
        dead = [worker for worker in self._workers() if worker.exitcode is not None]
        if dead and WorkerSetupStatus.STARTING in status:
            log.error("the engine worker died while loading the model (exit code %s)", dead[0].exitcode)
            self._fail_startup()
            return True
        return False

    def _watch(self) -> None:
        try:
            while not self.shared.stopping:
                if not self._ready:
                    if self._watch_startup():
                        return
                elif self._watch_engine() or self._watch_http():
                    return
                time.sleep(0.2)
        except (OSError, EOFError):  # LitServe's manager is gone: the server is ending anyway
            return

    def _watch_http(self) -> bool:
        for process in (getattr(self.server, "http_processes", None) or {}).values():
            if getattr(process, "exitcode", None) is not None and not self.shared.stopping:
                log.error("an HTTP process died (exit code %s); the server ends so that its supervisor starts it "
                          "again", process.exitcode)
                self.exit_code = 1
                self.stop("an HTTP process died")
                return True
        return False

    def _watch_engine(self) -> bool:
        """Each new worker process LitServe holds is a restart; too many in RESTART_WINDOW end the server."""
        workers = self._workers()
        pid = workers[0].pid if workers else None
        restarts = self._restarts
        if self._engine_seen is not None and pid != self._engine_seen:
            restarts.append(time.monotonic())
            while restarts[0] < time.monotonic() - RESTART_WINDOW:
                restarts.popleft()
            log.error("the engine worker died and was restarted (%d time(s) in %.0f s)", len(restarts),
                      RESTART_WINDOW)
            if len(restarts) > MAX_ENGINE_RESTARTS:
                self.exit_code = 1
                self.stop("the engine keeps dying")
                return True
        self._engine_seen = pid if pid is not None else self._engine_seen
        return False
