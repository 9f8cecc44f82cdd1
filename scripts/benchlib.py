"""Reusable pieces of scripts/bench: tools it starts inside a Sandbox and how it measures.

Importing this module needs only the standard library, so the latency client can
run anywhere (`python benchlib.py latency HOST PORT N`), also under `mirrord-ns
run`. The pieces that drive a `mirrord_tun.sandbox.Sandbox` take it as an
argument and start every process through `sb.start(...)`, so `sb.close()` stops
them by PID.

    SshServer(sb, ...).start()    OpenSSH sshd in a namespace, own keys and config
    SshForward / Sshuttle         `ssh -L` and sshuttle clients through that sshd
    iperf3_server / iperf3_argv / iperf3_gbits
    latency_argv / latency_stats  HTTP GET latency, a new TCP connection per request
    ProcWatch                     peak RSS, CPU (per wall-clock span), minor faults
    profile_raw / summarize_raw   py-spy record (non-blocking) and its summary
    perf_record / perf_summary    system-wide perf, per-process hottest symbols
    wait_until / port_open_in / child_pids / median / percentile / stop_process
"""
from __future__ import annotations

import http.client
import json
import re
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Iterable

HERE = os.path.dirname(os.path.abspath(__file__))
IPERF_PORT = 5201


# --------------------------------------------------------------------------- small helpers
def median(values: Iterable[float]) -> float:
    v = list(values)
    return statistics.median(v) if v else float("nan")


def percentile(values: Iterable[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    v = sorted(values)
    if not v:
        return float("nan")
    k = max(0, min(len(v) - 1, int(round(p / 100 * len(v) + 0.5)) - 1))
    return v[k]


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def child_pids(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def port_open_in(sb: Any, role: str, host: str, port: int, timeout: float = 2) -> bool:
    """Can a TCP connection to host:port be opened from namespace `role` within `timeout`?"""
    try:
        p = sb.exec(role, "timeout", str(timeout), "bash", "-c", f"exec 3<>/dev/tcp/{host}/{port}",
                    timeout=timeout + 5)
    except subprocess.TimeoutExpired:
        return False
    return p.returncode == 0


def stop_process(p: subprocess.Popen, sig: int = signal.SIGTERM, wait: float = 5) -> None:
    if p.poll() is None:
        try:
            p.send_signal(sig)
            p.wait(wait)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        except ProcessLookupError:
            pass


# --------------------------------------------------------------------------- OpenSSH server
class SshServer:
    """An OpenSSH sshd started in one namespace of a Sandbox, with its own keys and config.

    Only the generated client key (`self.key`) logs in (as root). Everything lives
    in a temporary directory removed by `close()`; the process is stopped by PID
    (and by `sb.close()` in any case).
    """

    def __init__(self, sb: Any, role: str = "node", listen: str = "198.19.0.2", port: int = 22,
                 client_role: str = "laptop", permit_tunnel: bool = False) -> None:
        self.sb, self.role, self.listen, self.port, self.client_role = sb, role, listen, port, client_role
        self.permit_tunnel = permit_tunnel  # `ssh -w` (layer 3 only), off unless a row needs it
        self.dir = tempfile.mkdtemp(prefix="bench-sshd.")
        self.key = os.path.join(self.dir, "client_key")
        self.log = os.path.join(self.dir, "sshd.log")
        self.proc: subprocess.Popen | None = None
        self._made_privsep_dir = False
        # Where clients connect, when not straight to the sshd (a relay on the path).
        self.via: tuple[str, int] | None = None

    def ssh_command(self, *extra: str) -> list[str]:
        """`ssh` argv (without the destination) that logs in with the generated key."""
        return ["ssh", "-F", "/dev/null", "-i", self.key, "-o", "IdentitiesOnly=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
                *(["-p", str(self.via[1])] if self.via else []), *extra]

    @property
    def destination(self) -> str:
        return f"root@{self.via[0] if self.via else self.listen}"

    def start(self, timeout: float = 15) -> "SshServer":
        host_key = os.path.join(self.dir, "host_key")
        for path in (host_key, self.key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mirrord-ns-bench",
                            "-f", path], check=True, capture_output=True)
        authorized = os.path.join(self.dir, "authorized_keys")
        shutil.copy(self.key + ".pub", authorized)
        os.chmod(authorized, 0o600)
        config = os.path.join(self.dir, "sshd_config")
        with open(config, "w") as f:
            f.write(f"""\
ListenAddress {self.listen}
Port {self.port}
HostKey {host_key}
AuthorizedKeysFile {authorized}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
UseDNS no
AllowTcpForwarding yes
X11Forwarding no
PrintMotd no
PidFile none
LogLevel ERROR
PermitTunnel {"point-to-point" if self.permit_tunnel else "no"}
""")
        if not os.path.isdir("/run/sshd"):  # privilege separation directory (systemd makes it normally)
            os.makedirs("/run/sshd", mode=0o755)
            self._made_privsep_dir = True
        test = subprocess.run(["/usr/sbin/sshd", "-t", "-f", config], capture_output=True, text=True)
        if test.returncode != 0:
            raise RuntimeError(f"sshd -t: {test.stderr.strip()}")
        with open(self.log, "wb") as log:
            self.proc = self.sb.start(self.role, ["/usr/sbin/sshd", "-D", "-e", "-f", config],
                                      stdin=subprocess.DEVNULL, stdout=log, stderr=log)

        def logged_in() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {open(self.log).read().strip()}")
            p = self.sb.exec(self.client_role, *self.ssh_command("-o", "ConnectTimeout=2"),
                             self.destination, "true", timeout=10)
            return p.returncode == 0

        wait_until(logged_in, timeout, f"sshd on {self.listen}:{self.port}", interval=0.2)
        return self

    def close(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)
        if self._made_privsep_dir:
            try:
                os.rmdir("/run/sshd")
            except OSError:
                pass
            self._made_privsep_dir = False


class SshForward:
    """`ssh -L 127.0.0.1:LOCAL:HOST:PORT ...` from `role` through an SshServer.

    interactive=True holds a session with a pty open (`ssh -tt ... sleep`), as a user
    with a shell open has it: OpenSSH then sets TCP_NODELAY on its connection (both
    ends). With interactive=False (`ssh -N`) it does not, and small request/response
    exchanges through the forward stall on Nagle + delayed ACK (~40 ms).
    """

    def __init__(self, server: SshServer, forwards: dict[int, tuple[str, int]], role: str = "laptop",
                 cipher: str = "aes128-gcm@openssh.com", interactive: bool = True) -> None:
        self.server, self.forwards, self.role, self.cipher = server, forwards, role, cipher
        self.interactive = interactive
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 15) -> "SshForward":
        spec: list[str] = []
        for local, (host, port) in self.forwards.items():
            spec += ["-L", f"127.0.0.1:{local}:{host}:{port}"]
        mode = ["-tt"] if self.interactive else ["-N"]
        argv = self.server.ssh_command(*mode, "-c", self.cipher, "-o", "ExitOnForwardFailure=yes",
                                       *spec, self.server.destination,
                                       *(["sleep", "86400"] if self.interactive else []))
        # -tt wants a stdin to read; a pipe we never write keeps the session open.
        self.proc = self.server.sb.start(self.role, argv, stdin=subprocess.PIPE if self.interactive else
                                         subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        for local in self.forwards:
            def ready(local: int = local) -> bool:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"ssh -L exited with {self.proc.returncode}")
                return port_open_in(self.server.sb, self.role, "127.0.0.1", local)
            wait_until(ready, timeout, f"ssh -L 127.0.0.1:{local}", interval=0.2)
        return self

    def close(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            if self.proc.stdin:
                self.proc.stdin.close()
            self.proc = None


class SshTunnel:
    """`ssh -w` from `role` through an SshServer: OpenSSH's own layer-3 tunnel, a TUN at each end
    and the packets carried in C (aes128-gcm, a session with a pty as SshForward has, so
    TCP_NODELAY). The floor of any TUN-over-SSH design on this machine: the server's namespace
    forwards and masquerades the tunnel's packets (as the agent does in the pod's), the client's
    routes `subnet` into its TUN (as `run`'s namespace does). `close()` undoes all of it."""

    UNIT = 77  # tun77 at both ends: the Sandbox's own namespaces, nothing else names a TUN so
    CLIENT_ADDR, SERVER_ADDR = "100.64.77.1", "100.64.77.2"
    TABLE = "mirrord_ns_bench_ssh_w"

    def __init__(self, server: SshServer, subnet: str, role: str = "laptop",
                 cipher: str = "aes128-gcm@openssh.com") -> None:
        self.server, self.subnet, self.role, self.cipher = server, subnet, role, cipher
        self.dev = f"tun{self.UNIT}"
        self.proc: subprocess.Popen | None = None
        self._forward_was: str | None = None

    def start(self, timeout: float = 15) -> "SshTunnel":
        s, sb = self.server, self.server.sb
        argv = s.ssh_command("-tt", "-c", self.cipher, "-o", "Tunnel=point-to-point", "-w",
                             f"{self.UNIT}:{self.UNIT}", "-o", "ExitOnForwardFailure=yes", s.destination,
                             "sleep", "86400")
        self.proc = sb.start(self.role, argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)

        def both_up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ssh -w exited with {self.proc.returncode}")
            return all(sb.exec(r, "ip", "link", "show", self.dev).returncode == 0 for r in (self.role, s.role))
        wait_until(both_up, timeout, f"ssh -w {self.dev}", interval=0.2)
        self._forward_was = sb.exec(s.role, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() or "0"
        for role, here, peer in ((self.role, self.CLIENT_ADDR, self.SERVER_ADDR),
                                 (s.role, self.SERVER_ADDR, self.CLIENT_ADDR)):
            self._ip(role, "addr", "add", here, "peer", peer, "dev", self.dev)
            self._ip(role, "link", "set", self.dev, "up")
        self._ip(self.role, "route", "replace", self.subnet, "dev", self.dev)
        self._run(s.role, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        nft = (f"table ip {self.TABLE} {{\n chain post {{\n type nat hook postrouting priority srcnat\n"
               f' ip saddr {self.CLIENT_ADDR} oifname != "{self.dev}" masquerade\n }}\n}}\n')
        self._run(s.role, "nft", "-f", "-", input=nft)
        return self

    def close(self) -> None:
        sb, node = self.server.sb, self.server.role
        if self.proc is not None:
            stop_process(self.proc)
            if self.proc.stdin:
                self.proc.stdin.close()
            self.proc = None
        sb.exec(self.role, "ip", "route", "del", self.subnet, "dev", self.dev)
        sb.exec(node, "nft", "delete", "table", "ip", self.TABLE)
        if self._forward_was is not None:
            sb.exec(node, "sysctl", "-qw", f"net.ipv4.ip_forward={self._forward_was}")
            self._forward_was = None

    def _ip(self, role: str, *args: str) -> None:
        self._run(role, "ip", *args)

    def _run(self, role: str, *argv: str, input: str | None = None) -> None:
        p = self.server.sb.exec(role, *argv, input=input)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:4])} in {role}: {p.stderr.strip()}")


def run_time(pid: int) -> tuple[float, int]:
    """CPU seconds so far of one process, from the scheduler's nanosecond run time of every thread
    (/proc/<pid>/stat counts 10 ms ticks, a fifth of what a 300-request run costs), and how many
    times its threads were put on a CPU: the wake-ups, each paying for a switch and cold caches."""
    total = slices = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            run_ns, _wait_ns, ran = f.read().split()[:3]
        total += int(run_ns)
        slices += int(ran)
    return total / 1e9, slices


def tree_cpu(pids: Iterable[int]) -> tuple[float, float, int]:
    """CPU seconds so far of these processes and all their descendants alive now: in all
    (run_time), the part in the kernel (ticks: read it over many requests), and times on a CPU."""
    total, system, slices, todo = 0.0, 0.0, 0, list(pids)
    while todo:
        pid = todo.pop()
        try:
            cpu, ran = run_time(pid)
            system += _cpu_and_faults(pid)[2]
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        total += cpu
        slices += ran
        todo += child_pids(pid)
    return total, system, slices


class Sshuttle:
    """sshuttle from `role` (its firewall rules go into that namespace only) via an SshServer.

    The client namespace needs a route to `subnet` for connect() to reach the
    firewall's redirect at all; `route_via` adds one (and `close()` removes it).
    `method` is tried in order ("auto" means sshuttle's default, nat via iptables).
    """

    def __init__(self, server: SshServer, subnet: str, probe: tuple[str, int], role: str = "laptop",
                 methods: tuple[str, ...] = ("auto", "nft"), route_via: str | None = None,
                 cipher: str | None = "aes128-gcm@openssh.com") -> None:
        self.server, self.subnet, self.probe, self.role = server, subnet, probe, role
        self.methods, self.route_via, self.cipher = methods, route_via, cipher
        self.proc: subprocess.Popen | None = None
        self.method = ""
        self.log = os.path.join(server.dir, "sshuttle.log")
        self._route = False

    def start(self, timeout: float = 20) -> "Sshuttle":
        sb = self.server.sb
        if self.route_via:
            p = sb.exec(self.role, "ip", "route", "replace", self.subnet, "via", self.route_via)
            if p.returncode != 0:
                raise RuntimeError(f"route {self.subnet} via {self.route_via}: {p.stderr.strip()}")
            self._route = True
        if port_open_in(sb, self.role, *self.probe, timeout=1):
            raise RuntimeError(f"{self.role} reaches {self.probe[0]}:{self.probe[1]} without sshuttle; "
                               "its numbers would not measure sshuttle")
        ssh = " ".join(self.server.ssh_command(*(["-c", self.cipher] if self.cipher else [])))
        errors = []
        for method in self.methods:
            argv = ["sshuttle", "--method", method, "--python", "python3", "-e", ssh,
                    "-r", self.server.destination, self.subnet]
            with open(self.log, "ab") as log:
                self.proc = sb.start(self.role, argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)

            def ready() -> bool:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"sshuttle --method {method} exited with {self.proc.returncode}")
                return b"Connected to server" in _read(self.log) and port_open_in(sb, self.role, *self.probe)
            try:
                wait_until(ready, timeout, f"sshuttle --method {method}", interval=0.3)
                self.method = method
                return self
            except RuntimeError as e:
                errors.append(f"{e}: {_read(self.log).decode(errors='replace')[-400:].strip()}")
                self.stop_client()
        raise RuntimeError("sshuttle did not start: " + " | ".join(errors))

    def stop_client(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, wait=8)
            self.proc = None

    def close(self) -> None:
        self.stop_client()
        if self._route:
            self.server.sb.exec(self.role, "ip", "route", "del", self.subnet)
            self._route = False


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


# --------------------------------------------------------------------------- iperf3
def iperf3_server(sb: Any, role: str, bind: str, port: int = IPERF_PORT) -> subprocess.Popen:
    p = sb.start(role, ["iperf3", "-s", "-B", bind, "-p", str(port)],
                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: port_open_in(sb, role, bind, port), 10, f"iperf3 -s on {bind}:{port}")
    return p


def iperf3_argv(host: str, port: int = IPERF_PORT, seconds: float = 5, reverse: bool = False) -> list[str]:
    return ["iperf3", "-c", host, "-p", str(port), "-t", str(seconds), "-J",
            "--connect-timeout", "5000", *(["-R"] if reverse else [])]


def iperf3_gbits(output: str) -> float:
    """Receiver-side throughput of one iperf3 -J run, in Gbit/s."""
    data = json.loads(output)
    if "error" in data:
        raise RuntimeError(f"iperf3: {data['error']}")
    return data["end"]["sum_received"]["bits_per_second"] / 1e9


# --------------------------------------------------------------------------- HTTP latency
def latency_argv(host: str, port: int, requests: int, warmup: int = 20, python: str | None = None,
                 keepalive: bool = False) -> list[str]:
    return [python or sys.executable, os.path.join(HERE, "benchlib.py"), "latency", host, str(port),
            str(requests), str(warmup), *(["keepalive"] if keepalive else [])]


def measure_latency(host: str, port: int, requests: int, warmup: int = 20,
                    span: list[float] | None = None, keepalive: bool = False) -> list[float]:
    """Sequential GET / requests, each on a new TCP connection (or all on one, `keepalive`);
    seconds per request (connect + request + full response + close), measured in this process.
    `span` receives the wall-clock (time.time()) start and end of the counted requests."""
    samples: list[float] = []
    conn = http.client.HTTPConnection(host, port, timeout=10)
    for i in range(warmup + requests):
        if i == warmup and span is not None:
            span.append(time.time())
        t0 = time.perf_counter()
        if not keepalive:
            conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("GET", "/")
        resp = conn.getresponse()
        resp.read()
        if not keepalive:
            conn.close()
        dt = time.perf_counter() - t0
        if resp.status != 200:
            raise RuntimeError(f"GET / -> {resp.status}")
        if i >= warmup:
            samples.append(dt)
    if span is not None:
        span.append(time.time())
    conn.close()
    return samples


def poll_argv(host: str, port: int, every: float, python: str | None = None) -> list[str]:
    return [python or sys.executable, os.path.join(HERE, "benchlib.py"), "poll", host, str(port), str(every)]


def poll(host: str, port: int, every: float, report_every: float = 5.0) -> None:
    """GET / every `every` seconds (a new connection each) until SIGTERM/SIGINT; prints
    the running totals (and the slowest successful request) as a JSON line every
    `report_every` seconds and on the way out."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    ok = fail = 0
    last_error = ""
    slowest = 0.0
    next_report = time.monotonic() + report_every
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            conn = http.client.HTTPConnection(host, port, timeout=5)
            conn.request("GET", "/")
            resp = conn.getresponse()
            resp.read()
            conn.close()
            if resp.status != 200:
                raise RuntimeError(f"GET / -> {resp.status}")
            ok += 1
            slowest = max(slowest, time.monotonic() - t0)
        except (OSError, RuntimeError, http.client.HTTPException) as e:
            fail += 1
            last_error = str(e) or type(e).__name__
        if time.monotonic() >= next_report:
            print(json.dumps({"ok": ok, "fail": fail, "slowest_s": slowest, "last_error": last_error}), flush=True)
            next_report += report_every
        stop.wait(max(0.0, every - (time.monotonic() - t0)))
    print(json.dumps({"ok": ok, "fail": fail, "slowest_s": slowest, "last_error": last_error}), flush=True)


# How long `latency` and `timed` stay after their span: `run` exits with its command, and without
# a ProcWatch sample after the span's end its CPU over the span is unknown (most bulk runs said "-").
LINGER = 0.25


def timed_argv(argv: list[str]) -> list[str]:
    """`argv` run by `benchlib.py timed`: its output as JSON {"span": [start, end], "stdout": ...}."""
    return [sys.executable, os.path.join(HERE, "benchlib.py"), "timed", *argv]


_COUNTERS = re.compile(r"local: (\d+) packets / (\d+) bytes sent, (\d+) packets / (\d+) bytes received")


def tunnel_packets(run_stderr: str) -> tuple[int, int] | None:
    """(packets, bytes) through the local TUN, both ways, from `run -v`'s closing counters."""
    m = _COUNTERS.search(run_stderr)
    return (int(m[1]) + int(m[3]), int(m[2]) + int(m[4])) if m else None


def latency_stats(output: str) -> dict[str, float]:
    data = json.loads(output)
    ms = [s * 1000 for s in data["samples"]]
    return {"p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99), "mean_ms": statistics.fmean(ms),
            "min_ms": min(ms), "max_ms": max(ms), "n": len(ms), "span": data.get("span")}


# --------------------------------------------------------------------------- process watching
def _proc_status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0]) * 1024
    return out


def _cpu_and_faults(pid: int) -> tuple[float, int, float]:
    """CPU seconds (user+system), minor page faults and system CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    hz = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / hz, int(fields[7]), int(fields[12]) / hz


def _system_cpu() -> list[int]:
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def _cpu_shares(a: list[int], b: list[int]) -> dict[str, float]:
    """Machine-wide CPU use between two /proc/stat samples, % of all cores."""
    d = [y - x for x, y in zip(a, b)]
    total = sum(d[:8]) or 1  # user nice system idle iowait irq softirq steal
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    shares = {n: 100.0 * v / total for n, v in zip(names, d)}
    shares["busy"] = 100.0 - shares["idle"] - shares["iowait"]
    return shares


class ProcWatch:
    """Samples VmRSS/VmHWM and CPU time of named processes in a background thread.

    `targets` maps a name to a callable returning the PID (or None while it is
    not known yet). `peak_rss[name]` is the largest VmHWM/VmRSS seen; `cpu[name]`
    the CPU seconds it used while watched, `minflt[name]` its minor page faults
    (fresh pages touched: a sign of malloc giving memory back to the kernel and
    taking it again); `wall` the watched time; `system`
    the machine-wide CPU shares (% of all cores) over the watched time.
    """

    def __init__(self, targets: dict[str, Callable[[], int | None]], interval: float = 0.1) -> None:
        self.targets = targets
        self.interval = interval
        self.peak_rss: dict[str, int] = {}
        self.cpu: dict[str, float] = {}
        self.minflt: dict[str, int] = {}
        # name -> [(time.time(), cpu seconds, system cpu seconds, times on a CPU)] since watched
        self.series: dict[str, list[tuple[float, float, float, int]]] = {}
        self._cpu0: dict[str, tuple[int, float, int, float, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.wall = 0.0
        self.system: dict[str, float] = {}

    def __enter__(self) -> "ProcWatch":
        self._t0 = time.monotonic()
        self._stat0 = _system_cpu()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.wall = time.monotonic() - self._t0
        self.system = _cpu_shares(self._stat0, _system_cpu())

    def _sample(self) -> None:
        for name, get in self.targets.items():
            pid = get()
            if not pid:
                continue
            try:
                st = _proc_status(pid)
                _, faults, sys_cpu = _cpu_and_faults(pid)
                cpu, ran = run_time(pid)
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue
            self.peak_rss[name] = max(self.peak_rss.get(name, 0), st.get("VmHWM", 0), st.get("VmRSS", 0))
            if name not in self._cpu0 or self._cpu0[name][0] != pid:
                self._cpu0[name] = (pid, cpu, faults, sys_cpu, ran)
            self.cpu[name] = cpu - self._cpu0[name][1]
            self.minflt[name] = faults - self._cpu0[name][2]
            self.series.setdefault(name, []).append((time.time(), self.cpu[name], sys_cpu - self._cpu0[name][3],
                                                     ran - self._cpu0[name][4]))

    def cpu_between(self, name: str, t0: float, t1: float, what: str = "cpu") -> float | None:
        """CPU seconds ("cpu"), only system CPU seconds ("system") or times on a CPU ("slices")
        of `name` between two wall-clock times, interpolated between samples; None if the
        samples do not cover them."""
        k = {"cpu": 1, "system": 2, "slices": 3}[what]
        pts = [(p[0], p[k]) for p in self.series.get(name) or []]
        if len(pts) < 2 or t0 < pts[0][0] or t1 > pts[-1][0]:
            return None

        def at(t: float) -> float:
            for (ta, ca), (tb, cb) in zip(pts, pts[1:]):
                if ta <= t <= tb:
                    return ca if tb == ta else ca + (cb - ca) * (t - ta) / (tb - ta)
            return pts[-1][1]
        return at(t1) - at(t0)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)
        self._sample()


# --------------------------------------------------------------------------- profiling (py-spy)
def py_spy() -> str | None:
    cand = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return cand if os.access(cand, os.X_OK) else shutil.which("py-spy")


def profile_raw(pid: int, seconds: float, out: str, rate: int = 250) -> subprocess.Popen | None:
    """Start `py-spy record` (collapsed stacks, non-blocking) on `pid`; None without py-spy."""
    exe = py_spy()
    if not exe:
        return None
    return subprocess.Popen([exe, "record", "--nonblocking", "-r", str(rate), "-d", str(max(1, int(seconds))),
                             "-f", "raw", "-o", out, "--pid", str(pid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarize_raw(path: str, top: int = 30) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's collapsed output."""
    total = 0
    self_: dict[str, int] = {}
    incl: dict[str, int] = {}
    try:
        lines = open(path).read().splitlines()
    except FileNotFoundError:
        return {"samples": 0, "self": [], "inclusive": []}
    for line in lines:
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        total += count
        frames = [_short(f) for f in stack.split(";")]
        if frames:
            self_[frames[-1]] = self_.get(frames[-1], 0) + count
        for f in set(frames):
            incl[f] = incl.get(f, 0) + count

    def best(d: dict[str, int]) -> list[tuple[str, float]]:
        return [(k, 100.0 * v / total) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]
    return {"samples": total, "self": best(self_), "inclusive": best(incl)}


def _short(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py:123)"
    name, _, where = frame.partition(" (")
    if where:
        where = os.path.basename(where.rstrip(")"))
        return f"{name} ({where})"
    return name


# --------------------------------------------------------------------------- profiling (perf)
def perf_record(out: str, seconds: float) -> subprocess.Popen | None:
    """System-wide `perf record` (cpu-clock, call graphs) for `seconds`; None without perf."""
    exe = shutil.which("perf")
    if not exe:
        return None
    return subprocess.Popen([exe, "record", "-q", "-F", "499", "-e", "cpu-clock", "-g", "-a", "-o", out,
                             "--", "sleep", str(max(1, int(seconds)))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _perf_report(path: str, *args: str) -> list[tuple[float, str]]:
    p = subprocess.run(["perf", "report", "-i", path, "-q", "-g", "none", *args],
                       capture_output=True, text=True, timeout=120)
    rows = []
    for line in p.stdout.splitlines():
        parts = line.split()
        if parts and parts[0].endswith("%"):
            try:
                rows.append((float(parts[0][:-1]), " ".join(parts[1:])))
            except ValueError:
                pass
    return rows


def perf_summary(path: str, named: dict[str, int | None], top: int = 8) -> dict[str, Any]:
    """Share of the machine per process, and for each named PID its hottest symbols
    (self time, % of that process's samples)."""
    if not os.path.exists(path):
        return {}
    names = {pid: name for name, pid in named.items() if pid}
    procs = []
    for pct, what in _perf_report(path, "--no-children", "--sort", "pid", "--percent-limit", "1")[:top]:
        pid_s, _, comm = what.partition(":")
        pid = int(pid_s) if pid_s.strip().isdigit() else 0
        procs.append((names.get(pid, comm.strip() or what), pid, pct))
    out: dict[str, Any] = {"machine": procs}
    for name, pid in named.items():
        if not pid:
            continue
        rel = ["--pid", str(pid), "--percentage", "relative"]
        syms = _perf_report(path, "--no-children", *rel, "--sort", "dso,sym", "--percent-limit", "1")
        out[name] = {"self": [(w.split()[-1] + " [" + os.path.basename(w.split()[0]).strip("[]") + "]", p)
                              for p, w in syms[:top]]}
    return out


# --------------------------------------------------------------------------- CLI for the helpers
def _main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "latency":
        host, port = argv[1], int(argv[2])
        n = int(argv[3]) if len(argv) > 3 else 300
        warmup = int(argv[4]) if len(argv) > 4 else 20
        span: list[float] = []
        samples = measure_latency(host, port, n, warmup, span, keepalive=argv[5:6] == ["keepalive"])
        print(json.dumps({"samples": samples, "span": span}))
        time.sleep(LINGER)
        return 0
    if len(argv) >= 2 and argv[0] == "timed":
        t0 = time.time()
        p = subprocess.run(argv[1:], stdout=subprocess.PIPE)
        print(json.dumps({"span": [t0, time.time()], "stdout": p.stdout.decode()}))
        time.sleep(LINGER)
        return p.returncode
    if len(argv) == 4 and argv[0] == "poll":
        poll(argv[1], int(argv[2]), float(argv[3]))
        return 0
    print("usage: benchlib.py latency HOST PORT [N [WARMUP [keepalive]]] | poll HOST PORT EVERY_S | timed CMD...",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
