"""``baklava-triton`` (write a model repository) and ``baklava-serve`` (run tritonserver)."""

from __future__ import annotations

import signal
import tempfile
import threading
from pathlib import Path

import click

from baklava.cli_options import engine_options
from baklava.cli_runner import entry_point, log
from baklava.errors import BaklavaError


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option("--repo", type=click.Path(file_okay=False), required=True, help="Model repository to create.")
@click.option("--instances", default=1, show_default=True, type=click.IntRange(1), help="Model instances.")
@engine_options
@click.option("--chat/--no-chat", default=True, show_default=True, help="Apply the chat template to prompts.")
@click.option(
    "--threads", type=click.IntRange(1), help="Torch threads per instance (default: cores / instances)."
)
@click.option("--force", is_flag=True, help="Replace an existing repository.")
def triton_cmd(artifact, repo, instances, device, kv_memory, max_batch, prefill_chunk, chat, threads, force):
    """Write a Triton model repository (Python backend, token streaming) for ARTIFACT."""
    from baklava.serving.triton_repo import write_repository

    path = write_repository(
        artifact,
        repo,
        instances=instances,
        device=device,
        chat=chat,
        threads=threads,
        kv_memory=kv_memory,
        max_batch=max_batch,
        prefill_chunk=prefill_chunk,
        overwrite=force,
    )
    log(f"wrote model repository {path} (serve it with: baklava-serve {path})")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("path", type=click.Path(file_okay=False, exists=False))
@click.option("--http-port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--grpc-port", default=8001, show_default=True, type=click.IntRange(0, 65535))
@click.option("--metrics-port", default=8002, show_default=True, type=click.IntRange(0, 65535))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--instances", default=1, show_default=True, type=click.IntRange(1), help="For an artifact DIR."
)
@click.option(
    "--timeout", default=600, show_default=True, type=click.IntRange(1), help="Seconds to wait for ready."
)
@click.option("--log", "log_path", type=click.Path(dir_okay=False), help="Server log file.")
@engine_options
def serve_cmd(path, http_port, grpc_port, metrics_port, host, instances, timeout, log_path, **engine):
    """Serve an artifact DIR or a model REPO with a real tritonserver until Ctrl-C.

    An artifact gets a temporary repository with --device, --kv-memory, --max-batch and
    --prefill-chunk; a repository keeps the settings it was written with.
    """
    from baklava.serving.triton_repo import repository_to_serve

    with tempfile.TemporaryDirectory(prefix="baklava-repo-") as temp:  # an artifact's repository
        repo = repository_to_serve(path, temp, instances=instances, **engine)
        _serve_until_stopped(repo, http_port, grpc_port, metrics_port, host, timeout, log_path)


def _serve_until_stopped(repo, http_port, grpc_port, metrics_port, host, timeout, log_path) -> None:
    """Run tritonserver for ``repo`` until Ctrl-C or SIGTERM (or until it dies: an error)."""
    from baklava.serving.server import TritonServer
    from baklava.serving.triton_repo import MODEL_NAME

    log_path = log_path or str(Path(tempfile.gettempdir()) / "baklava-tritonserver.log")
    server = TritonServer(repo, http_port, grpc_port, metrics_port, host=host, log_path=Path(log_path))
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        log(f"starting tritonserver for {repo} (log: {log_path})")
        server.start(timeout=timeout)
        url = f"http://{server.http_url}"
        log(f"ready: HTTP {url}  gRPC {server.grpc_url}  metrics http://{host}:{server.metrics_port}/metrics")
        click.echo(
            f"curl -s {url}/v2/models/{MODEL_NAME}/generate "
            '-d \'{"text_input": "What is the capital of France?", "max_tokens": 32}\''
        )
        try:
            while not stop.wait(1.0):
                if server.process is None or server.process.poll() is not None:
                    raise BaklavaError(f"tritonserver exited unexpectedly (log: {log_path})")
        except KeyboardInterrupt:
            pass
        log("shutting down")
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)


triton_main = entry_point(triton_cmd, "baklava-triton")
serve_main = entry_point(serve_cmd, "baklava-serve")
