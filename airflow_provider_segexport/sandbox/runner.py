"""Start and stop the sandbox: in a background thread (tests) or in the foreground (the CLI)."""

from __future__ import annotations

import json
import socket
import tempfile
import threading
import time
from pathlib import Path

from airflow_provider_segexport.sandbox.core import Latency, Sandbox


class SandboxServer:
    """The sandbox app served by uvicorn.

    >>> with SandboxServer() as sb:            # doctest: +SKIP
    ...     sb.info["mailchimp"]["base_url"]
    """

    def __init__(
        self,
        host: str = "localhost",
        port: int = 0,
        *,
        tls: bool = True,
        tls_dir: str | Path | None = None,
        latency: Latency | None = None,
        token_ttl: int = 3600,
        seed: dict | None = None,
        faults: str = "",
        rng_seed: int | None = None,
        log_level: str = "warning",
        tls_hostnames: list[str] | tuple[str, ...] = (),
        public_host: str | None = None,
        info_file: str | Path | None = None,
    ) -> None:
        self.host = host
        self.port = port or _free_port(host)
        self.tls = tls
        self._tmp = None
        if tls and tls_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="segexport-sandbox-")
            tls_dir = self._tmp.name
        self.tls_dir = Path(tls_dir) if tls_dir else None
        self.sandbox = Sandbox(latency=latency, token_ttl=token_ttl, seed=seed, rng_seed=rng_seed)
        if faults:
            for rule in self.sandbox.faults.parse(faults):
                self.sandbox.faults.add(rule)
        self.log_level = log_level
        self.tls_hostnames = list(tls_hostnames)
        #: the host name clients use in URLs (e.g. the compose service name); default: ``host``
        self.public_host = public_host
        self.info_file = Path(info_file) if info_file else None
        self._server = None
        self._thread: threading.Thread | None = None
        self.ca_bundle: str | None = None

    @property
    def base(self) -> str:
        host = self.public_host or ("localhost" if self.host in ("0.0.0.0", "::") else self.host)
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    @property
    def info(self) -> dict:
        return self.sandbox.info(self.base, self.ca_bundle)

    def _config(self):
        import uvicorn

        kwargs = {}
        if self.tls:
            from airflow_provider_segexport.sandbox import tls

            files = tls.generate(self.tls_dir, [*self.tls_hostnames, *([self.public_host] if self.public_host else [])])
            self.ca_bundle = str(files.ca_cert)
            kwargs.update(ssl_certfile=str(files.cert), ssl_keyfile=str(files.key))
        bind = "127.0.0.1" if self.host == "localhost" else self.host
        return uvicorn.Config(
            self.sandbox.build_app(), host=bind, port=self.port, log_level=self.log_level,
            access_log=False, lifespan="off", timeout_keep_alive=30, backlog=2048,
            timeout_graceful_shutdown=1, **kwargs,
        )

    def start(self, timeout: float = 30.0) -> SandboxServer:
        import uvicorn

        self._server = uvicorn.Server(self._config())
        self._server.install_signal_handlers = lambda: None  # not the main thread
        self._thread = threading.Thread(target=self._server.run, name="segexport-sandbox", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"sandbox did not start on {self.base}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def serve_forever(self) -> None:
        """Run in the foreground (CLI): print the JSON line once listening, stop on Ctrl-C/SIGTERM."""
        import uvicorn

        config = self._config()
        server = uvicorn.Server(config)
        printed = threading.Event()

        def announce() -> None:
            while not server.started and not server.should_exit:
                time.sleep(0.02)
            if server.started:
                line = json.dumps(self.info)
                if self.info_file is not None:
                    self.info_file.parent.mkdir(parents=True, exist_ok=True)
                    self.info_file.write_text(line + "\n")
                print(line, flush=True)
                printed.set()

        threading.Thread(target=announce, daemon=True).start()
        server.run()

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1" if host == "localhost" else host, 0))
        return sock.getsockname()[1]
