"""Start and stop a real ``tritonserver`` for a model repository.

The server binary and the Python backend ship in the ``nvidia-pytriton`` wheel. Started directly
(not through PyTriton's proxy), it needs three things set up here:

* a backend directory whose ``python/`` holds ``libtriton_python.so``, its utils, and the Python
  backend stub built for *this* interpreter's version (PyTriton keeps one per version);
* ``LD_LIBRARY_PATH`` with this interpreter's own ``LIBDIR`` first (otherwise the stub may bind
  another libpython and extension modules fail with undefined symbols), then the wheel's libs;
* this interpreter's ``bin`` directory first on ``PATH``: the stub's embedded Python locates its
  environment (a venv's ``site-packages`` and ``.pth`` files, hence baklava and torch) from the
  ``python3`` it finds there, and ignores ``PYTHONPATH``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from baklava.errors import BaklavaError
from baklava.model_zoo import cache_dir
from baklava.serving.triton_repo import MODEL_NAME


def _pytriton_root() -> Path:
    # find_spec, not import: PyTriton's own package imports dependencies we do not install.
    spec = importlib.util.find_spec("pytriton")
    root = Path(spec.origin).resolve().parent if spec and spec.origin else None
    if root is None or not (root / "tritonserver" / "bin" / "tritonserver").is_file():
        raise BaklavaError(
            "tritonserver not found: install it with  pip install --no-deps nvidia-pytriton==0.7.0"
        )
    return root


def backend_directory() -> Path:
    """A backend directory for this interpreter (assembled once in the user cache)."""
    root = _pytriton_root() / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise BaklavaError(f"the installed nvidia-pytriton has no Python backend stub for Python {version}")
    target = cache_dir() / "triton" / f"backends-py{version}"
    python_dir = target / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        link, source = python_dir / name, root / "backends" / "python" / name
        # (re)link when missing, dangling, or pointing at another install (a moved virtualenv)
        if not (link.exists() and link.resolve() == source.resolve()):
            tmp = link.with_name(f"{name}.{os.getpid()}.tmp")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(source)
            os.replace(tmp, link)
    dst = python_dir / "triton_python_backend_stub"
    if not dst.exists() or dst.stat().st_size != stub.stat().st_size:
        tmp = dst.with_suffix(".tmp")
        shutil.copy2(stub, tmp)
        os.replace(tmp, dst)
    return target


def server_env() -> dict:
    """The server's environment. The copied stub's ``$ORIGIN`` rpath no longer reaches the
    wheel's vendored libraries (its CUDA runtime among them), so they go on ``LD_LIBRARY_PATH``
    from beside the installed ``pytriton`` package, wherever that is (a virtualenv, a user site,
    ``pip install --target`` on ``PYTHONPATH``)."""
    env = dict(os.environ)
    libs = [sysconfig.get_config_var("LIBDIR"), str(_pytriton_root().parent / "nvidia_pytriton.libs")]
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs if p)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class TritonServer:
    """A ``tritonserver`` process on loopback ports; use as a context manager.

    Parameters
    ----------
    repository : Path
        Model repository to serve.
    http_port, grpc_port, metrics_port : int
        0 picks a free port.
    """

    repository: Path
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    host: str = "127.0.0.1"
    log_path: Path | None = None
    process: subprocess.Popen | None = field(default=None, init=False)
    _log_start: int = field(default=0, init=False, repr=False)  # where this run's log begins

    def __post_init__(self) -> None:
        self.repository = Path(self.repository).resolve()
        self.http_port = self.http_port or free_port(self.host)
        self.grpc_port = self.grpc_port or free_port(self.host)
        self.metrics_port = self.metrics_port or free_port(self.host)

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def command(self) -> list[str]:
        binary = _pytriton_root() / "tritonserver" / "bin" / "tritonserver"
        return [
            str(binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={backend_directory()}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true",
            "--exit-on-error=true",
            "--strict-readiness=true",
            "--log-verbose=0",
        ]

    def start(self, timeout: float = 300.0, probe: bool = True) -> TritonServer:
        """Start the server and wait until it and its models are ready, then (``probe``) until the
        ``baklava`` model, when the repository has one, answers a first request (:meth:`probe`)."""
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self._log_start = log.tell() if self.log_path else 0  # the log may hold earlier runs
        self.process = subprocess.Popen(
            self.command(), env=server_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        if log is not subprocess.DEVNULL:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self._log_tail()
                self.process = None
                raise BaklavaError(f"tritonserver exited during startup{tail}")
            if self.is_ready():
                if probe and (self.repository / MODEL_NAME).is_dir():
                    self.probe(timeout=max(1.0, deadline - time.monotonic()))
                return self
            time.sleep(0.5)
        self.stop()
        raise BaklavaError(f"tritonserver not ready after {timeout:.0f} s{self._log_tail()}")

    def probe(self, timeout: float = 300.0) -> None:
        """One token for a short prompt; on failure the server is stopped and a
        :class:`BaklavaError` names the cause. A ready server does not mean a serving one: with
        nvidia-pytriton 0.7.0's Python 3.12 backend stub under numpy 2 (the H200 machine's stack),
        the model loads and the server reports ready, then the stub garbles the first request's
        string tensor (every byte read as the first: its length prefix 41 becomes 0x29292929),
        dies, and every later request fails with "Stub process is not healthy"."""
        body = json.dumps({"text_input": "Hello", "max_tokens": 1}).encode()
        url = f"http://{self.http_url}/v2/models/{MODEL_NAME}/generate"
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                response.read()
                return
        except urllib.error.HTTPError as e:
            reason = f"HTTP {e.code}: {e.read().decode(errors='replace').strip()[:200]}"
        except (urllib.error.URLError, OSError) as e:
            reason = f"{type(e).__name__}: {e}"
        text = self.log_text()
        tail = self._log_tail(text)
        if "deserialize_bytes_tensor" in (text or ""):  # the stub's pybind11 misreads numpy 2's dtypes
            tail += "; the Python backend stub garbles string tensors under numpy 2: run it with numpy<2"
        self.stop()
        raise BaklavaError(f"tritonserver is ready but its model failed a first request ({reason}){tail}")

    def log_text(self) -> str | None:
        """What this server wrote to its log (not earlier runs appended to the same file); None
        without a log file."""
        if not self.log_path or not Path(self.log_path).is_file():
            return None
        with open(self.log_path, "rb") as f:
            f.seek(self._log_start)
            return f.read().decode(errors="replace")

    def _log_tail(self, text: str | None = None) -> str:
        """`` (last error line; log: path)`` of this run's log (``text``: already read)."""
        text = self.log_text() if text is None else text
        if text is None:
            return ""
        lines = [ln for ln in text.splitlines() if ln.strip()]
        errors = [ln for ln in lines if " E" in ln[:12] or "error" in ln.lower()]
        return f" ({(errors or lines or [''])[-1].strip()[:300]}; log: {self.log_path})"

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server and every process it started (its whole process group)."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        pgid = os.getpgid(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            proc.wait()
        deadline = time.monotonic() + timeout  # the stubs leave shortly after the server
        while time.monotonic() < deadline and _group_alive(pgid):
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)

    def __enter__(self) -> TritonServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
