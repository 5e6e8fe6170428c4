"""Runs verification jobs on the board: one worker process per runtime, fed one job at a time.

A job that hangs or crashes its runtime takes only its worker process with it: the lane kills it
at the timeout and starts a fresh one, and the next job in the queue runs there. Workers load models
from bytes only, and run in an empty read-only folder of their own: a reference to a file that got
past the protocol's checks (ONNX external data resolves against the working folder) finds nothing.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import sys
import tempfile
import threading
from concurrent.futures import Future
from typing import Any

import numpy as np

from edgekit.agent.protocol import FILES, Job, Refused

PYTHON_ENV = "EDGEKIT_WORKER_PYTHON"  # the command that starts this Python, where it is not sys.executable


def run_job(job: Job) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The job's task in the runtime its format names: its output arrays, and the runtime's description with the
    timings the task measures (single inferences; the encoder of a pair; decode steps of a language model)."""
    from edgekit.runtimes import lm_runner, runner_for

    if job.task == "lm":
        from edgekit.runtimes.onnx_lm import lm_outputs

        lm = lm_runner(job.models, job.format, job.threads)
        windows, prompts, new_tokens = job.arrays["windows"], job.arrays["prompts"], job.arrays["new_tokens"]
        if new_tokens.shape != (1,) or not 2 <= int(new_tokens[0]) <= 4096:
            raise ValueError("new_tokens must hold one count from 2 to 4096")
        outputs = lm_outputs(lm, windows, prompts, int(new_tokens[0]))
        return outputs, {"runtime": lm.description, "timings_ms": [round(float(t), 4) for t in
                                                                   outputs["decode_ms"].ravel()]}
    files = len(FILES[job.format])  # the model's files (an OpenVINO IR's weights after its XML), then a decoder
    runner = runner_for(job.models[0], job.format, job.threads, b"".join(job.models[1:files]))
    if job.task == "segment":
        from edgekit.runtimes.onnxruntime import cpu_session
        from edgekit.runtimes.sam_pair import pair_outputs

        outputs, timings = pair_outputs(runner, cpu_session(job.models[files], job.threads), job.arrays,
                                        job.warmup, job.runs)
    else:
        inputs = job.arrays["inputs"]
        outputs, timings = {"outputs": runner.run(inputs)}, runner.time(inputs[0], job.warmup, job.runs)
    return outputs, {"runtime": runner.description, "timings_ms": [round(t, 4) for t in timings]}


def _serve(connection: Any, empty: str) -> None:
    """The worker process: jobs in, results or the error's message out, until the agent closes the pipe. Its
    lifetime is the lane's: Ctrl-C reaches the agent, which stops it, and the agent's end leaves it quietly."""
    from edgekit.errors import first_line

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.path[:] = [os.path.abspath(entry) for entry in sys.path]  # imports still resolve after the chdir
    try:
        os.chdir(empty)
    except OSError:  # the lane closed while this worker started
        return
    while True:
        try:
            job = connection.recv()
        except (EOFError, OSError):  # the agent is gone
            return
        try:
            connection.send(("ok", run_job(job)))
        except Exception as err:  # the runtime's own error types: reported to the client, the worker lives on
            connection.send(("error", f"{type(err).__name__}: {first_line(err)}"))


class Lane:
    """One runtime's bounded queue and worker: jobs run one at a time, in arrival order; a full queue refuses
    (503) rather than loses a job, and a job past `timeout` seconds is answered 504 and its worker replaced."""

    def __init__(self, name: str, capacity: int, timeout: float) -> None:
        self.name = name
        self.timeout = timeout
        self.jobs: queue.Queue[tuple[Job, Future]] = queue.Queue(maxsize=capacity)
        self._empty = tempfile.TemporaryDirectory(prefix=f"edgekit-{name}-")  # the workers' working folder
        os.chmod(self._empty.name, 0o500)
        self._context = multiprocessing.get_context("spawn")  # no inherited server sockets or threads
        if os.environ.get(PYTHON_ENV):  # an interpreter that must be started through a wrapper (qemu emulation)
            self._context.set_executable(os.environ[PYTHON_ENV])
        self._start_worker()
        threading.Thread(target=self._dispatch, name=f"lane-{name}", daemon=True).start()

    def _start_worker(self) -> None:
        self._connection, child = self._context.Pipe()
        self._process = self._context.Process(target=_serve, args=(child, self._empty.name),
                                              name=f"edgekit-{self.name}", daemon=True)
        self._process.start()
        child.close()

    def submit(self, job: Job) -> Future:
        future: Future = Future()
        try:
            self.jobs.put_nowait((job, future))
        except queue.Full:
            raise Refused(503, f"the {self.name} queue is full ({self.jobs.maxsize} jobs); retry later") from None
        return future

    def _dispatch(self) -> None:
        while True:
            job, future = self.jobs.get()
            try:
                self._connection.send(job)
                if not self._connection.poll(self.timeout):
                    self._restart()
                    future.set_exception(Refused(504, f"the job ran past {self.timeout:g} s; its worker was restarted"))
                    continue
                status, payload = self._connection.recv()
            except (EOFError, OSError, BrokenPipeError):  # the worker died (a runtime crash)
                self._restart()
                future.set_exception(Refused(500, "the runtime crashed on this model; its worker was restarted"))
                continue
            if status == "ok":
                future.set_result(payload)
            else:
                future.set_exception(Refused(422, f"the runtime refused the model: {payload}"))

    def _restart(self) -> None:
        self._process.kill()
        self._process.join()
        self._connection.close()
        self._start_worker()

    def close(self) -> None:
        self._process.kill()
        self._process.join()
        self._empty.cleanup()
