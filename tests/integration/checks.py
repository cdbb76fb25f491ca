"""What the Python integration suites share: a case's failure, its checks, and stopping a server process."""

import signal
import subprocess


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
