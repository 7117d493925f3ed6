"""`shadowllm serve DIR/triton`: the Triton Inference Server bundled in nvidia-pytriton, started on
this machine for a model repository from `build --target triton`.

The server and its Python backend live in their own environment, .venv/triton (scripts/setup.sh;
$SHADOWLLM_TRITON_ENV overrides): the backend's stub process embeds the Python whose `python3` comes
first on PATH, and its compiled code reads arrays with numpy 1.x, so PATH starts with that
environment (numpy 1.26, then .venv's site-packages through a .pth). The shared libraries the wheel
ships and the interpreter's libpython go on LD_LIBRARY_PATH. The server listens on loopback unless
told otherwise; `serve` waits until the model is ready, prints the endpoints, and stops the server
cleanly on Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from shadowllm.models import ShadowError

MODEL = "shadowllm"


@dataclass(frozen=True)
class ServerEnv:
    python_bin: Path  # the serving environment's bin/ (its python3 first on PATH)
    server: Path      # .../pytriton/tritonserver
    libraries: Path   # .../nvidia_pytriton.libs

    @property
    def binary(self) -> Path:
        return self.server / "bin" / "tritonserver"

    def environment(self) -> dict:
        env = dict(os.environ)
        env["PATH"] = f"{self.python_bin}{os.pathsep}{env.get('PATH', '')}"
        libpython = sysconfig.get_config_var("LIBDIR") or ""
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(self.libraries), libpython,
                                                             env.get("LD_LIBRARY_PATH", "")) if p)
        env.setdefault("HF_HUB_OFFLINE", "1")  # the model loads its tokenizer from the export folder only
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        return env


def server_env() -> ServerEnv:
    """The bundled server's environment, or one line saying how to install it."""
    root = Path(os.environ.get("SHADOWLLM_TRITON_ENV") or Path(sys.prefix) / "triton")
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    site = root / "lib" / f"python{version}" / "site-packages"
    env = ServerEnv(root / "bin", site / "pytriton" / "tritonserver", site / "nvidia_pytriton.libs")
    missing = [p for p in (env.binary, env.server / "backends" / "python" / "triton_python_backend_stub",
                           env.python_bin / "python3") if not p.exists()]
    if missing:
        raise ShadowError(f"the bundled Triton Inference Server is not installed in {root} (missing {missing[0]}); "
                          "scripts/setup.sh installs it (nvidia-pytriton 0.7.0 in .venv/triton)")
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        raise ShadowError(f"this Python ({sys.executable}) has no shared libpython, which Triton's Python backend "
                          "embeds: use a Python built with --enable-shared (Debian's, pyenv's with "
                          "PYTHON_CONFIGURE_OPTS=--enable-shared)")
    return env


def check_repository(repository: Path) -> Path:
    repository = Path(repository)
    if not (repository / MODEL / "config.pbtxt").is_file():
        raise ShadowError(f"{repository}: not a model repository from `shadowllm build DIR --target triton` "
                          f"(no {MODEL}/config.pbtxt)")
    return repository.resolve()


class TritonServer:
    """A running tritonserver process (a context manager: started on enter, stopped on exit)."""

    def __init__(self, repository: str | Path, host: str = "127.0.0.1", http_port: int = 8000,
                 grpc_port: int = 8001, metrics_port: int | None = None, log: str | Path | None = None):
        self.repository = check_repository(Path(repository))
        self.env = server_env()
        self.host, self.http_port, self.grpc_port, self.metrics_port = host, http_port, grpc_port, metrics_port
        self.log_path = Path(log) if log else self.repository.parent / "triton-server.log"
        self.process: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.http_port}"

    def command(self) -> list[str]:
        metrics = ["--allow-metrics", "false"] if self.metrics_port is None else \
            ["--allow-metrics", "true", "--metrics-address", self.host, "--metrics-port", str(self.metrics_port)]
        return [str(self.env.binary), "--model-repository", str(self.repository),
                "--backend-directory", str(self.env.server / "backends"),
                "--http-address", self.host, "--http-port", str(self.http_port),
                "--grpc-address", self.host, "--grpc-port", str(self.grpc_port), *metrics,
                "--exit-on-error", "true", "--strict-readiness", "true", "--log-verbose", "0"]

    def start(self, timeout: float = 300.0) -> "TritonServer":
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(self.command(), env=self.env.environment(), stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                reason = self.load_error()
                raise ShadowError(f"tritonserver exited with status {self.process.returncode} while loading "
                                  f"{self.repository}: " + (reason + f" (log: {self.log_path})" if reason
                                                            else f"\n{self.log_tail()}"))
            if self._ready():
                return self
            time.sleep(0.5)
        self.stop()
        raise ShadowError(f"tritonserver did not get ready within {timeout:.0f} s (log: {self.log_path}):\n"
                          f"{self.log_tail()}")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/models/{MODEL}/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def load_error(self) -> str | None:
        """Why the model did not load, from Triton's log line `failed to load '<model>' ...: <reason>`
        (the reason without the Python traceback that follows it), or None."""
        import re

        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return None
        found = re.search(r"failed to load '[^']*' version \d+: (.*?)(?:\\n|\"$)", text, re.MULTILINE)
        return found.group(1) if found else None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> None:
        """SIGINT (Triton's own graceful shutdown: in-flight requests finish, models unload), then kill
        (after `timeout`, or at once on a second Ctrl-C)."""
        if not self.alive():
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):  # too slow, or a second Ctrl-C: kill it
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self):
        return self.start() if self.process is None else self

    def __exit__(self, *exc):
        self.stop()
        return False


def _stop_on(*signums):
    """Turn each of `signums` into KeyboardInterrupt while the server runs; returns the handlers to put
    back. Set explicitly because a process started in the background by a non-interactive shell
    inherits SIGINT ignored (Python then installs no handler of its own), and `docker stop`, systemd
    and Kubernetes ask with SIGTERM, not Ctrl-C."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    return {s: signal.signal(s, interrupt) for s in signums}


def serve(repository: str | Path, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 8001,
          metrics_port: int | None = 8002, timeout: float = 300.0) -> int:
    server = TritonServer(repository, host, http_port, grpc_port, metrics_port)
    print(f"[shadowllm] starting tritonserver on {host} (log: {server.log_path})", file=sys.stderr)
    previous = _stop_on(signal.SIGINT, signal.SIGTERM)
    try:
        with server:
            print(f"serving {server.repository} — model `{MODEL}`\n"
                  f"  HTTP     {server.http_url}  (POST /v2/models/{MODEL}/generate, /generate_stream)\n"
                  f"  gRPC     {server.http_url.split('//')[1].rsplit(':', 1)[0]}:{grpc_port}\n"
                  + (f"  metrics  http://{server.http_url.split('//')[1].rsplit(':', 1)[0]}:{metrics_port}/metrics\n"
                     if metrics_port is not None else "")
                  + "Ctrl-C (or SIGTERM) stops the server.", flush=True)
            try:
                while server.alive():
                    time.sleep(0.5)
            except KeyboardInterrupt:
                print("\n[shadowllm] stopping tritonserver", file=sys.stderr)
                return 0
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    print(f"tritonserver exited with status {server.process.returncode}:\n{server.log_tail()}", file=sys.stderr)
    return 1
