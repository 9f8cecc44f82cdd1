"""A static Go binary under `run`: the program nothing can be preloaded into.

CGO off, Go's own resolver and raw syscalls: no libc, so no LD_PRELOAD tool sees it; under
`run` it resolves the pod's DNS names from the pod's resolv.conf, reaches a service from the
pod's address, and serves the pod's traffic, stolen and mirrored, seeing the real client's
address. Built once from the standard library alone (no module download) with the toolchain
scripts/cluster uses; its build cache is kept beside the cluster's, outside the clone.
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import pytest
from conftest import POD, Cluster, mrd_run, read_line, start_run, wait_until
from test_steal import LIVENESS, Agent, Run, agent, get, runs, sb  # noqa: F401 - `agent`, `runs`, `sb` are fixtures

from mirrord_tun.sandbox import ADDRS, Sandbox

CLIENT = ADDRS["client"]
GO = shutil.which("go") or "/usr/local/go/bin/go"
GOCACHE = "/var/cache/mirrord-ns/gocache-tests"
PROGRAM = """
package main

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"time"
)

func main() {
	switch os.Args[1] {
	case "get": // get URL: the body on stdout
		r, err := (&http.Client{Timeout: 10 * time.Second}).Get(os.Args[2])
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		defer r.Body.Close()
		io.Copy(os.Stdout, r.Body)
	case "serve": // serve ADDR: "ready", then one line per request with the client's address
		ln, err := net.Listen("tcp", os.Args[2])
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		fmt.Println("ready")
		http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			host, _, _ := net.SplitHostPort(r.RemoteAddr)
			fmt.Println("request from", host)
			fmt.Fprintf(w, "hello from go, you are %s\\n", host)
		}))
	}
}
"""


@pytest.fixture(scope="module")
def gobin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not os.access(GO, os.X_OK):
        pytest.skip(f"no Go toolchain at {GO} (scripts/cluster needs the same one)")
    src = tmp_path_factory.mktemp("go")
    (src / "main.go").write_text(PROGRAM)
    env = {**os.environ, "CGO_ENABLED": "0", "GOTOOLCHAIN": "local", "GOCACHE": GOCACHE, "GOFLAGS": "-trimpath",
           "GOPATH": str(src / "gopath"), "HOME": str(src)}
    subprocess.run([GO, "build", "-o", "static", "main.go"], cwd=src, env=env, check=True, timeout=600,
                   capture_output=True)
    binary = src / "static"
    binary.chmod(0o755)
    yield str(binary)


def program_headers(path: str) -> list[int]:
    """The ELF program header types of a 64-bit little-endian executable."""
    data = Path(path).read_bytes()
    assert data[:6] == b"\x7fELF\x02\x01", "not a 64-bit little-endian ELF"
    phoff, = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    return [struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)]


def test_the_binary_is_static(gobin: str) -> None:
    pt_interp, pt_dynamic = 3, 2
    assert not {pt_interp, pt_dynamic} & set(program_headers(gobin))  # no loader, so nothing preloaded


def test_it_resolves_a_pod_dns_name_and_reaches_the_service_as_the_pod(cluster: Cluster, gobin: str) -> None:
    r = mrd_run(cluster.sb, gobin, "get", "http://svc/")  # "svc": the pod's search domains
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"hello from svc, you are {POD}\n"


def test_it_answers_the_pods_clients_under_steal(sb: Sandbox, agent: Agent, runs: list[Run], gobin: str) -> None:
    run = Run(sb, [gobin, "serve", "0.0.0.0:80"])
    runs.append(run)
    assert read_line(run.proc) == "ready\n", run.log()
    assert wait_until(lambda: get(sb) == f"hello from go, you are {CLIENT}", LIVENESS), (get(sb), run.log())
    assert read_line(run.proc).startswith("request from ")


def test_it_gets_a_copy_of_the_pods_traffic_under_mirror(sb: Sandbox, agent: Agent, gobin: str) -> None:
    p = start_run(sb, gobin, "serve", "0.0.0.0:80", stderr=subprocess.DEVNULL)
    answers: list[str] = []
    done = threading.Event()

    def clients() -> None:  # until the mirror has subscribed the port, no copy is made
        while not done.wait(0.25):
            answers.append(get(sb))

    caller = threading.Thread(target=clients)
    try:
        assert read_line(p) == "ready\n"
        caller.start()
        assert read_line(p, LIVENESS) == f"request from {CLIENT}\n"  # the copy, from the real client
    finally:
        done.set()
        if caller.is_alive():
            caller.join()
        sb.stop(p)
    assert answers and all(a == f"hello from pod, you are {CLIENT}" for a in answers), answers  # the pod answered
