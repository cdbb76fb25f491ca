"""What the Python integration suites share: a case's failure, its checks, and stopping a server process."""

import signal
import subprocess
import time
import traceback


class Failed(Exception):
    """A check of a case did not hold (the suite reports it and goes on with the next case)."""


def expect(cond, what):
    if not cond:
        raise Failed(what)


def stop_process(proc, timeout):
    """SIGTERM (the server drains), then SIGKILL if it is still running after `timeout` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_cases(cases, env, only=(), after_each=None):
    """Runs each case_<name>(env) whose name contains one of `only` (all when empty), printing PASS or FAIL
    with its time; `after_each(env)` (e.g. "the server is still alive") runs after each case and may fail
    it. A failed case does not stop the others; `after_each` failing after a failed case does.
    Returns (passed, failed)."""
    passed = failed = 0
    for case in cases:
        name = case.__name__[len("case_"):]
        if only and not any(o in name for o in only):
            continue
        t = time.time()
        try:
            case(env)
            if after_each:
                after_each(env)
            print(f"PASS {name} ({time.time() - t:.1f} s)", flush=True)
            passed += 1
        except Exception as ex:  # noqa: BLE001 (a case fails, the suite goes on)
            print(f"FAIL {name} ({time.time() - t:.1f} s): {ex}", flush=True)
            if not isinstance(ex, Failed):
                traceback.print_exc()
            failed += 1
            if after_each:
                after_each(env)  # raises when the case left the environment broken: the suite stops
    return passed, failed
