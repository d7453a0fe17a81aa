"""`moec serve` as a process: it starts on a free port, serves, and on SIGTERM drains (the
listening socket closes, a short request in flight finishes, a long one is cut at
--drain-timeout) and exits 0."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from serving import CONTEXT

import moec
from moec.cli import main


def start(artifact, *args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(moec.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moec.cli", "serve", str(artifact), "--port", "0",
         "--log-level", "warning", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env)
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(120)
    if not line or "http://" not in line[0]:
        proc.kill()
        pytest.fail(f"moec serve did not start: {line} {proc.stderr.read()}")
    port = int(line[0].rsplit(":", 1)[1].split("/")[0])
    return proc, port


def stream(port, body):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200
    assert r.readline().startswith(b"data: {")  # generating
    return r


def test_sigterm_drains_then_exits(artifact):
    proc, port = start(artifact, "--drain-timeout", "1.5", "--max-batch", "4")
    try:
        short = stream(port, {"prompt": "The fox", "max_tokens": 12, "ignore_eos": True})
        long = stream(port, {"prompt": "The fox", "max_tokens": CONTEXT - 100,
                             "ignore_eos": True})
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rest = short.read().decode()  # the short one runs to its end
        assert rest.endswith("data: [DONE]\n\n") and '"finish_reason":"length"' in rest
        with pytest.raises(OSError):  # no new connections
            for _ in range(100):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                time.sleep(0.05)
        try:
            cut = long.read().decode()  # the long one is cut at the drain timeout
        except http.client.IncompleteRead as e:
            cut = e.partial.decode()
        # cut: the stream ends without a finish, or (when the server flushes it before the
        # connection closes: a race either way) with finish_reason "abort" and [DONE]
        finishes = set(re.findall(r'"finish_reason":"(\w+)"', cut))
        assert finishes <= {"abort"} and ("[DONE]" in cut) == bool(finishes), cut[-400:]
        assert proc.wait(timeout=60) == 0
        assert 1.0 < time.monotonic() - t0 < 30
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_serve_argument_errors(artifact, tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nothing.moec"), "--port", "0"]) == 1
    assert "moec: error:" in capsys.readouterr().err
    assert main(["serve", str(artifact), "--port", "70000"]) == 1
    assert "--port must be in 0..65535" in capsys.readouterr().err
    assert main(["serve", str(artifact), "--max-queue", "-1"]) == 1
    assert "max_queue must be an integer >= 0" in capsys.readouterr().err
