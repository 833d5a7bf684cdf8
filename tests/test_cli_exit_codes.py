"""One exit status per kind of failure, the same for every command (README, ``dpop --help``).

0 success, 1 HTTP error status from the API or a failed doctor check, 2 usage or configuration,
3 the key or its token, 4 the authorization server refused, 5 network, 130 interrupted.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from dpop_signer.testing.servers import DEMO_CLIENT_SECRET
from tests.cli_support import (
    DPOP,
    assert_ok,
    assert_one_line_error,
    clean_env,
    dpop,
    stub_server,
    token_route,
)
from tests.test_cli_servers import closed_port, env_for

README = Path(__file__).resolve().parent.parent / "README.md"
CODES = {"0", "1", "2", "3", "4", "5", "130"}


def test_the_table_is_in_the_help_and_the_readme():
    help_text = assert_ok(dpop("--help")).out
    listed = set(re.findall(r"^\s+(\d+)\s{2,}\S", help_text, re.M))
    assert listed == CODES
    readme = README.read_text()
    rows = set(re.findall(r"^\| `?(\d+)`? \|", readme, re.M))
    assert rows >= CODES


def test_status_by_what_failed(local_servers, pem_key_path, tmp_path):
    env = env_for(local_servers, pem_key_path)
    api = local_servers.rs_url
    cases = [
        (["request", api + "/api/x"], {}, 0),
        (["request", api + "/nowhere"], {}, 1),
        (["request", "relative/path"], {}, 2),
        (["proof", "GET", "/relative"], {}, 2),
        (["token", "--client-secret-file", str(tmp_path / "none")], {}, 2),
        (["token"], {"DPOP_KEY": str(tmp_path / "none.pem")}, 3),
        (["token"], {"DPOP_CLIENT_SECRET": "wrong-secret-3"}, 4),
        (["token"], {"DPOP_TOKEN_URL": f"http://127.0.0.1:{closed_port()}/token"}, 5),
    ]
    for args, extra, code in cases:
        result = dpop(*args, env={**env, **extra})
        if code == 0:
            assert_ok(result)
        elif code == 1:
            assert result.code == 1, result.err
            assert "404" in result.err
        else:
            assert_one_line_error(result, code=code)


def test_a_timeout_is_a_network_failure(pem_key_path):
    with stub_server({}, hold="/token") as server:
        env = {
            "DPOP_KEY": pem_key_path,
            "DPOP_TOKEN_URL": server.url + "/token",
            "DPOP_CLIENT_ID": "c",
            "DPOP_CLIENT_SECRET": DEMO_CLIENT_SECRET,
        }
        started = time.monotonic()
        result = dpop("token", "--timeout", "0.5", env=env, timeout=20)
        line = assert_one_line_error(result, code=5)
        assert time.monotonic() - started < 15
    assert "--timeout" in line
    assert "timeout=" not in line  # the CLI's words, not httpx's


def test_interrupted_is_130(pem_key_path):
    with stub_server({"/token": token_route()}, hold="/api") as server:
        env = clean_env(
            {
                "DPOP_KEY": pem_key_path,
                "DPOP_TOKEN_URL": server.url + "/token",
                "DPOP_CLIENT_ID": "c",
                "DPOP_CLIENT_SECRET": DEMO_CLIENT_SECRET,
            }
        )
        proc = subprocess.Popen(
            [str(DPOP), "request", server.url + "/api"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            # Interrupt once the API request is waiting on the server, not before.
            deadline = time.monotonic() + 20
            while not server.requests_to("/api") and time.monotonic() < deadline:
                time.sleep(0.05)
            assert server.requests_to("/api"), "dpop request did not reach the API in 20 s"
            os.kill(proc.pid, signal.SIGINT)
            _out, err = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert proc.returncode == 130
    assert "Traceback" not in err
    assert err.strip() == "error: interrupted"


@pytest.mark.parametrize("args", [["token"], ["jwk"], ["doctor"]])
def test_configuration_errors_are_2_for_every_command(args, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("colour = 1\n")
    assert_one_line_error(dpop(*args, "--config", str(bad)), code=2, says="colour")
