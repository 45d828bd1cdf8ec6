"""docker-compose.yaml without Docker: the same CeleryExecutor deployment as processes on this machine.

What runs (each process in its own session, each with its own log under ``<root>/logs``):

- PostgreSQL (Debian's server binaries, a throw-away cluster in ``<root>/postgres``): the metadata
  database ``airflow`` (user ``airflow``, as in the compose file) and ``segexport``, the export state;
- Redis (Debian's ``redis-server``, no persistence) as the Celery broker;
- the vendor sandbox (in this process, from the compose file's ``sandbox`` command: plain HTTP, its
  ``--rng-seed`` credentials, the seed ``airflow-init`` wrote);
- from the project's virtualenv: ``airflow api-server``, ``scheduler``, ``dag-processor``, ``triggerer``
  and N ``celery worker`` processes (``airflow-worker-1``, ``-2``, ...).

One source of truth for the settings: the environment, the ``airflow-init`` script and the
healthchecks are read from docker-compose.yaml. Only what containers give for free is translated: the
service names become 127.0.0.1 and free ports, ``/opt/airflow`` becomes ``<root>``, and each process
gets its own host name (``SEGEXPORT_HOSTNAME``, returned by :func:`hostname` as
``[core] hostname_callable``) and its own log-server ports, as each container has its own network.
The export state goes to the ``segexport`` database through the connection ``segexport_state`` and the
Airflow Variable ``segexport_state_conn_id`` (see dags/segment_export.py).

``python -m tests.celery_deployment`` (``make celery``) starts it, prints the UI's URL and runs until
Ctrl-C; tests/test_celery_deployment.py drives it with a worker killed mid-export.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yaml"
BIN = Path(sys.executable).parent
STATE_CONN_ID = "segexport_state"


def hostname() -> str:
    """``[core] hostname_callable`` of every process: the host name its "container" has (on one machine the
    workers would otherwise share one and the task instances could not tell them apart)."""
    return os.environ.get("SEGEXPORT_HOSTNAME") or socket.getfqdn()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's interpolation: ``${VAR:-default}``, ``${VAR-default}``, ``${VAR}`` and ``$$``."""
    def one(m: re.Match) -> str:
        name, op, default = m.group(1), m.group(2), m.group(3) or ""
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        return env.get(name, "")

    out = re.sub(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}", one, value)
    return out.replace("$$", "$")


class DeploymentError(RuntimeError):
    pass


def postgres_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: [int(x) if x.isdigit() else x for x in Path(p).parent.parent.name.split(".")])
    return Path(found[-1]).parent if found else None


def missing_prerequisites() -> list[str]:
    """What this machine lacks to run the deployment (empty: it can)."""
    missing = []
    if postgres_bindir() is None:
        missing.append("PostgreSQL server binaries (/usr/lib/postgresql/*/bin/initdb: `make postgres`)")
    if not shutil.which("redis-server") and not Path("/usr/bin/redis-server").exists():
        missing.append("redis-server (`make redis`)")
    if os.geteuid() == 0:
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            missing.append("a `postgres` system user to run PostgreSQL as (Debian's postgresql package)")
    try:
        import airflow.providers.celery  # noqa: F401
    except ImportError:
        missing.append("apache-airflow-providers-celery (`make install`)")
    return missing


class Deployment:
    """The compose file's services as local processes. ``start()``, then ``stop()`` (or use ``with``).

    :param root: directory for everything (stands for ``/opt/airflow``); a temporary one by default.
    :param workers: Celery workers (the compose file's ``deploy.replicas`` by default).
    :param env: variables for the compose file's interpolation (e.g. ``SEGEXPORT_PROFILES``).
    :param airflow_overrides: extra ``AIRFLOW__*`` settings on top of the compose file's (tests: short
        heartbeat timeouts).
    :param dag_files: DAG files next to the repository's dags/ (tests only).
    :param api_port: the api-server's port (a free one by default).
    :param local_settings: text of ``<root>/config/airflow_local_settings.py`` (cluster policies).
    """

    def __init__(self, root: Path | None = None, *, workers: int | None = None, env: dict | None = None,
                 airflow_overrides: dict | None = None, dag_files: list[Path] = (), api_port: int | None = None,
                 local_settings: str | None = None) -> None:
        self.compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
        self.services = self.compose["services"]
        self._own_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="segexport-celery-")).resolve()
        self.workers = workers or int(self.services["airflow-worker"].get("deploy", {}).get("replicas", 1))
        self.interp_env = {**os.environ, **(env or {})}
        self.airflow_overrides = dict(airflow_overrides or {})
        self.dag_files = list(dag_files)
        self.local_settings = local_settings
        self.ports = {"postgres": free_port(), "redis": free_port(), "api": api_port or free_port(),
                      "sandbox": free_port(), "scheduler_health": free_port(), "triggerer_logs": free_port()}
        self.logs = self.root / "logs"
        self.procs: dict[str, subprocess.Popen] = {}
        self._log_files: list = []
        self.sandbox = None
        self._pg_prefix: list[str] = []
        self._token: str | None = None
        self._services: dict[str, tuple[str, str, dict]] = {}
        self.http = requests.Session()
        self.http.trust_env = False

    # -- the compose file, translated ------------------------------------------------------------------
    def rewrite(self, text: str) -> str:
        """Service names and container paths of the compose file -> this machine."""
        p = self.ports
        for old, new in (("@postgres/", f"@127.0.0.1:{p['postgres']}/"),
                         ("@redis:6379/", f"@127.0.0.1:{p['redis']}/"),
                         ("http://airflow-apiserver:8080/", f"http://127.0.0.1:{p['api']}/"),
                         ("http://sandbox:8443", f"http://127.0.0.1:{p['sandbox']}"),
                         ("http://localhost:8080/", f"http://127.0.0.1:{p['api']}/"),
                         ("http://localhost:8974/", f"http://127.0.0.1:{p['scheduler_health']}/"),
                         ("/opt/airflow", str(self.root)),
                         ("/opt/sandbox-tls", str(self.root / "sandbox-tls"))):
            text = text.replace(old, new)
        return text

    def service_env(self, service: str) -> dict[str, str]:
        """A service's ``environment`` (anchors merged), interpolated and rewritten."""
        raw = self.services[service].get("environment") or {}
        if isinstance(raw, list):
            raw = dict(item.split("=", 1) for item in raw)
        env = {k: self.rewrite(interpolate(str(v), self.interp_env)) for k, v in raw.items()}
        leftovers = {k: v for k, v in env.items()
                     if re.search(r"//(postgres|redis|sandbox|airflow-apiserver)\b|@(postgres|redis)\b|/opt/", v)}
        if leftovers:
            raise DeploymentError(f"docker-compose.yaml names something this deployment does not know: {leftovers}")
        return env

    def process_env(self, service: str, host: str, **extra: str) -> dict[str, str]:
        """The environment of one Airflow process: this shell's minus any Airflow setting, then the compose
        file's, then what a container would have differently."""
        base = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "_AIRFLOW"))}
        pg = self.ports["postgres"]
        env = {
            **base,
            **self.service_env(service),
            "AIRFLOW_HOME": str(self.root),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "HOSTNAME": host,
            "SEGEXPORT_HOSTNAME": host,
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "tests.celery_deployment.hostname",
            "AIRFLOW__API__PORT": str(self.ports["api"]),
            "AIRFLOW__API__HOST": "127.0.0.1",  # a container's port is published; here only this machine
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{self.ports['api']}",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": str(self.ports["scheduler_health"]),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(self.ports["triggerer_logs"]),
            # the export state in PostgreSQL, read by the example DAG through this Variable
            f"AIRFLOW_CONN_{STATE_CONN_ID.upper()}": json.dumps({
                "conn_type": "postgres", "host": "127.0.0.1", "port": pg, "login": "airflow",
                "password": "airflow", "schema": "segexport"}),
            "AIRFLOW_VAR_SEGEXPORT_STATE_CONN_ID": STATE_CONN_ID,
            **self.airflow_overrides,
            **extra,
        }
        return env

    # -- start and stop ---------------------------------------------------------------------------------
    def start(self, timeout: float = 240) -> Deployment:
        missing = missing_prerequisites()
        if missing:
            raise DeploymentError("cannot start the Celery deployment, missing: " + "; ".join(missing))
        for d in ("logs", "dags", "config", "data", "plugins", "sandbox-tls"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        for f in sorted((REPO / "dags").glob("*.py")):  # the compose file mounts ./dags
            (self.root / "dags" / f.name).symlink_to(f)
        for f in self.dag_files:
            (self.root / "dags" / f.name).symlink_to(f.resolve())
        if self.local_settings:
            (self.root / "config" / "airflow_local_settings.py").write_text(self.local_settings)
        try:
            self._start_postgres()
            self._start_redis()
            self._init()
            self._start_sandbox()
            self._start_airflow()
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> Deployment:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _popen(self, name: str, args: list[str], env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - kept open for the process's lifetime
        self._log_files.append(log)
        proc = subprocess.Popen(args, env=env, cwd=cwd or self.root, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs[name] = proc
        return proc

    def _start_postgres(self) -> None:
        bindir = postgres_bindir()
        data, sockets = self.root / "postgres" / "data", self.root / "postgres" / "sockets"
        sockets.mkdir(parents=True)
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            self._pg_prefix = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.root / "postgres", "postgres")
            shutil.chown(sockets, "postgres")
            os.chmod(self.root, 0o755)
        init = subprocess.run([*self._pg_prefix, str(bindir / "initdb"), "-D", str(data), "--auth=trust",
                               "-U", "airflow", "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"],
                              capture_output=True, text=True, timeout=180)
        if init.returncode:
            raise DeploymentError(f"initdb failed: {init.stdout[-2000:]}{init.stderr[-2000:]}")
        port = self.ports["postgres"]
        self._popen("postgres", [*self._pg_prefix, str(bindir / "postgres"), "-D", str(data), "-k", str(sockets),
                                 "-p", str(port), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                                 "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                                 "-c", "max_connections=300"], cwd=Path("/"))
        self._wait(lambda: subprocess.run([str(bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)])
                   .returncode == 0, 60, "postgres")
        for db in ("airflow", "segexport"):
            subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "airflow", db],
                           check=True, capture_output=True, timeout=60)

    def psql(self, sql: str, db: str = "segexport") -> str:
        """Run SQL in the deployment's PostgreSQL; the rows as text (``|``-separated)."""
        out = subprocess.run([str(postgres_bindir() / "psql"), "-h", "127.0.0.1", "-p", str(self.ports["postgres"]),
                              "-U", "airflow", "-d", db, "-Atc", sql], check=True, capture_output=True, text=True,
                             timeout=60)
        return out.stdout.strip()

    def _start_redis(self) -> None:
        redis = shutil.which("redis-server") or "/usr/bin/redis-server"
        (self.root / "redis").mkdir()
        port = self.ports["redis"]
        self._popen("redis", [redis, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(self.root / "redis"),
                              "--save", "", "--appendonly", "no", "--daemonize", "no"])

        def ping() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    return s.recv(16).startswith(b"+PONG")
            except OSError:
                return False

        self._wait(ping, 30, "redis")

    def _init(self) -> None:
        """The compose file's ``airflow-init`` script (database, admin password, pools, warehouse, seed)."""
        init = self.services["airflow-init"]
        args = [interpolate(str(a), self.interp_env) for a in init["command"]]
        args = [self.rewrite(a) for a in args]
        env = self.process_env("airflow-init", "airflow-init")
        proc = subprocess.run(["/bin/bash", *args], env=env, cwd=self.root, capture_output=True, text=True,
                              timeout=600)
        (self.logs / "airflow-init.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode:
            raise DeploymentError(f"airflow-init failed ({proc.returncode}): {(proc.stdout + proc.stderr)[-4000:]}")

    def _start_sandbox(self) -> None:
        from airflow_provider_segexport.sandbox.__main__ import build_parser
        from airflow_provider_segexport.sandbox.core import Latency
        from airflow_provider_segexport.sandbox.runner import SandboxServer

        cmd = self.services["sandbox"]["command"]
        cmd = shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]
        assert cmd[0] == "segexport-sandbox", cmd
        args = build_parser().parse_args([self.rewrite(interpolate(a, self.interp_env)) for a in cmd[1:]])
        seed = json.loads(Path(args.seed).read_text()) if args.seed else None
        self.sandbox = SandboxServer("127.0.0.1", self.ports["sandbox"], tls=not args.plain_http, tls_dir=args.tls_dir,
                                     latency=Latency(args.latency_ms, args.per_item_ms), seed=seed,
                                     rng_seed=args.rng_seed, faults=args.faults, log_level="warning")
        self.sandbox.start()
        self.sandbox.seed_file = args.seed

    def airflow_services(self) -> dict[str, tuple[str, str, dict]]:
        """name -> (compose service, host name, extra environment) of every Airflow process."""
        out = {name: (name, name, {}) for name in
               ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer")}
        for i in range(1, self.workers + 1):
            out[f"airflow-worker-{i}"] = ("airflow-worker", f"airflow-worker-{i}",
                                          {"AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port())})
        return out

    def _start_airflow(self) -> None:
        self._services = self.airflow_services()
        for name in self._services:
            self._start_process(name)

    def _start_process(self, name: str) -> None:
        service, host, extra = self._services[name]
        command = shlex.split(interpolate(str(self.services[service]["command"]), self.interp_env))
        if command[:2] == ["celery", "worker"]:
            command += ["--celery-hostname", f"celery@{host}"]
        self._popen(name, [str(BIN / "airflow"), *command], env=self.process_env(service, host, **extra))

    def restart(self, name: str, timeout: float = 120) -> None:
        """Start a process that exited again (the compose file's ``restart: always``) and wait until healthy."""
        if self.procs[name].poll() is None:
            raise DeploymentError(f"{name} is running")
        self._start_process(name)
        self.wait_healthy(timeout, [name])

    def healthcheck(self, name: str) -> bool:
        """The compose file's healthcheck of a process (its command, with this machine's ports/host names)."""
        service, host, extra = self._services[name]
        test = self.services[service]["healthcheck"]["test"]
        if isinstance(test, str):
            test = ["CMD-SHELL", test]
        env = self.process_env(service, host, **extra)
        if test[0] == "CMD-SHELL":
            args = ["/bin/sh", "-c", self.rewrite(interpolate(test[1], self.interp_env))]
        else:
            args = [self.rewrite(interpolate(str(a), self.interp_env)) for a in test[1:]]
        try:
            return subprocess.run(args, env=env, capture_output=True, timeout=60).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def wait_healthy(self, timeout: float, names: list[str] | None = None) -> None:
        deadline = time.monotonic() + timeout
        pending = list(names or self._services)
        while pending:
            for name in list(pending):
                proc = self.procs[name]
                if proc.poll() is not None:
                    raise DeploymentError(f"{name} exited ({proc.returncode}): {self.log(name)[-3000:]}")
                if self.healthcheck(name):
                    pending.remove(name)
            if pending and time.monotonic() > deadline:
                raise DeploymentError(f"not healthy after {timeout:.0f} s: {pending}")
            if pending:
                time.sleep(2)

    def stop(self) -> None:
        order = [n for n in self.procs if n.startswith("airflow-worker")] + [
            "airflow-triggerer", "airflow-dag-processor", "airflow-scheduler", "airflow-apiserver", "redis"]
        for name in order:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                _signal_group(proc.pid, signal.SIGTERM)
        for name in order:
            proc = self.procs.get(name)
            if proc is None:
                continue
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc.pid, signal.SIGKILL)  # leftovers of the group (task processes)
            proc.wait()
        if self.sandbox is not None:
            self.sandbox.stop()
            self.sandbox = None
        pg = self.procs.get("postgres")
        if pg is not None and pg.poll() is None:
            pg.terminate()
            try:
                pg.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pg.kill()
                pg.wait()
            data = self.root / "postgres" / "data"
            if (data / "postmaster.pid").exists():
                subprocess.run([*self._pg_prefix, str(postgres_bindir() / "pg_ctl"), "stop", "-D", str(data),
                                "-m", "immediate"], capture_output=True, timeout=60)
        for fh in self._log_files:
            fh.close()
        self._log_files.clear()
        if self._own_root and not os.environ.get("SEGEXPORT_KEEP_CELERY_ROOT"):
            shutil.rmtree(self.root, ignore_errors=True)

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    @staticmethod
    def _wait(check, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise DeploymentError(f"{what} did not start within {timeout:.0f} s")
            time.sleep(0.2)

    # -- killing a worker like a lost machine -------------------------------------------------------------
    def worker_of_host(self, host: str) -> str:
        name = host if host in self.procs and host.startswith("airflow-worker") else None
        if name is None:
            raise DeploymentError(f"no worker with host name {host!r}")
        return name

    def kill_worker(self, name: str, task_pid: int | None = None) -> list[int]:
        """SIGKILL a worker and everything it started (every process group among them: the task process runs
        in a group of its own), as when its machine is lost. ``task_pid`` must be one of them. The pids
        killed."""
        import psutil

        main = psutil.Process(self.procs[name].pid)
        procs = [main, *main.children(recursive=True)]
        pids = [p.pid for p in procs]
        if task_pid is not None and task_pid not in pids:
            raise DeploymentError(f"pid {task_pid} is not a process of {name} ({pids})")
        groups = set()
        for p in procs:
            try:
                groups.add(os.getpgid(p.pid))
            except ProcessLookupError:
                pass
        for g in groups:
            _signal_group(g, signal.SIGKILL, group=True)
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.procs[name].wait(timeout=30)
        return pids

    # -- the REST API -------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['api']}"

    def admin_password(self) -> str:
        path = self.service_env("airflow-apiserver")["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]
        return json.loads(Path(path).read_text())["admin"]

    def api(self, method: str, path: str, **kw) -> requests.Response:
        if self._token is None:
            r = self.http.post(f"{self.url}/auth/token", json={"username": "admin", "password": self.admin_password()},
                               timeout=30)
            r.raise_for_status()
            self._token = r.json()["access_token"]
        r = self.http.request(method, f"{self.url}/api/v2/{path.lstrip('/')}",
                              headers={"Authorization": f"Bearer {self._token}"}, timeout=30, **kw)
        return r

    def wait_dag(self, dag_id: str, timeout: float = 120) -> None:
        """Until the dag-processor has parsed ``dag_id``; then unpause it."""
        self._wait(lambda: self.api("GET", f"dags/{dag_id}").status_code == 200, timeout, f"DAG {dag_id}")
        self.api("PATCH", f"dags/{dag_id}", json={"is_paused": False}).raise_for_status()

    def trigger(self, dag_id: str, conf: dict) -> str:
        r = self.api("POST", f"dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf})
        r.raise_for_status()
        return r.json()["dag_run_id"]

    def dag_run(self, dag_id: str, run_id: str) -> dict:
        r = self.api("GET", f"dags/{dag_id}/dagRuns/{run_id}")
        r.raise_for_status()
        return r.json()

    def task_instance(self, dag_id: str, run_id: str, task_id: str) -> dict:
        r = self.api("GET", f"dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}")
        r.raise_for_status()
        return r.json()

    def tries(self, dag_id: str, run_id: str, task_id: str) -> list[dict]:
        r = self.api("GET", f"dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/tries")
        r.raise_for_status()
        return r.json()["task_instances"]

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value"):
        r = self.api("GET", f"dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}",
                     params={"deserialize": "true", "stringify": "false"})
        r.raise_for_status()
        return r.json()["value"]

    def wait_run(self, dag_id: str, run_id: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            state = self.dag_run(dag_id, run_id)["state"]
            if state in ("success", "failed"):
                return state
            if time.monotonic() > deadline:
                raise DeploymentError(f"{dag_id} {run_id} still {state} after {timeout:.0f} s")
            time.sleep(1)


def _signal_group(pid: int, sig: int, group: bool = False) -> None:
    try:
        os.killpg(pid if group else os.getpgid(pid), sig)
    except (ProcessLookupError, PermissionError):
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.celery_deployment", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=None, help="directory for everything (default: a temporary one, "
                   "deleted on exit)")
    p.add_argument("--port", type=int, default=8080, help="the UI's port (default 8080)")
    p.add_argument("--workers", type=int, default=None, help="Celery workers (default: the compose file's replicas)")
    args = p.parse_args(argv)
    if args.root is not None:
        args.root.mkdir(parents=True, exist_ok=True)
        if any(args.root.iterdir()):
            p.error(f"{args.root} is not empty")
    dep = Deployment(args.root, workers=args.workers, api_port=args.port)
    print(f"Starting the docker-compose.yaml deployment without Docker in {dep.root} "
          f"(PostgreSQL, Redis, sandbox, airflow-init, {dep.workers} Celery workers)...", flush=True)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        dep.start()
        print(f"\nAirflow UI: {dep.url}  (user admin, password {dep.admin_password()})\n"
              f"Sandbox:    http://127.0.0.1:{dep.ports['sandbox']}/_sandbox/state/mailchimp\n"
              f"Logs:       {dep.logs}/<process>.log\n"
              "Trigger segment_export in the UI (it starts paused). Ctrl-C stops everything.", flush=True)
        while not stop["now"]:
            for name, proc in dep.procs.items():
                if proc.poll() is not None:
                    print(f"{name} exited ({proc.returncode}); see {dep.logs / (name + '.log')}", flush=True)
                    stop["now"] = True
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    except DeploymentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        print("Stopping...", flush=True)
        dep.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
