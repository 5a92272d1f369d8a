"""Real services for the cluster tests, started from Debian's packages as root and stopped by pid.

- PostgreSQL (Debian `postgresql`): a private cluster in a temporary folder, the backend store
  (and the auth database) of an MLflow server with the basic-auth app on.
- SLURM (Debian `slurm-wlm`, `slurmdbd`, `munge`, `mariadb-server`): slurmctld + slurmd on this
  machine as a one-node cluster, with accounting (slurmdbd on MariaDB). Accounting is not
  optional: submitit learns that a job was cancelled (scancel, a dead node) only from `sacct`,
  and without it the launcher would wait for a cancelled job forever.
- Ray: `ray start --head --block`, a local cluster the Ray launcher connects to by address.

Every daemon runs in the foreground as a child of the test session (never daemonized), so
`Services.stop` ends exactly the processes it started, newest first. Each gets free ports,
its own folders and its own config: nothing under /etc is changed and a machine's own
SLURM, PostgreSQL or Ray (if any) is left alone.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

# Debian packages the services come from (installed with apt-get when missing).
SLURM_PACKAGES = ("slurm-wlm", "slurmdbd", "munge", "mariadb-server")
POSTGRES_PACKAGES = ("postgresql",)
VENV_BIN = Path(sys.executable).parent


class Unavailable(Exception):
    """A service cannot run here (not root, a package that does not install): the tests skip with this reason."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(what: str, check, timeout: float = 60.0, proc: subprocess.Popen | None = None, log: Path | None = None):
    """Poll `check` until it returns something truthy; fail with the service's log if it does not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        try:
            value = check()
            if value:
                return value
        except (OSError, subprocess.SubprocessError):
            pass
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-3000:] if log and log.is_file() else ""
    raise RuntimeError(f"{what} did not come up within {timeout:.0f} s (exit {proc.poll() if proc else '-'}):\n{tail}")


def ensure_packages(packages: tuple[str, ...]) -> None:
    """apt-get install what is missing, as root; Unavailable with the reason when that cannot be done."""
    if os.geteuid() != 0:
        raise Unavailable(f"needs root: the test starts {', '.join(packages)} daemons from Debian packages")
    if not shutil.which("dpkg-query") or not shutil.which("apt-get"):
        raise Unavailable("needs a Debian system (dpkg-query and apt-get) to install " + " ".join(packages))
    missing = [p for p in packages if subprocess.run(["dpkg-query", "-W", "-f=${Status}", p], capture_output=True,
                                                     text=True).stdout != "install ok installed"]
    if not missing:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Wait for another apt-get (an image still provisioning) rather than fail on its lock.
    install = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "-q", "--no-install-recommends", *missing]
    proc = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:  # a stale package list: update once, then try again
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600)
        proc = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise Unavailable(f"apt-get install {' '.join(missing)} failed: {last[0]}")


class Services:
    """Processes started for the session, stopped newest first by their own pid."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: list[tuple[str, subprocess.Popen, int]] = []
        self.cleanups: list = []

    def start(self, name: str, cmd: list[str], stop_signal: int = signal.SIGTERM, **kwargs) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "ab")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, **kwargs)
        log.close()
        self.procs.append((name, proc, stop_signal))
        return proc

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def stop(self) -> None:
        for name, proc, sig in reversed(self.procs):
            started = time.monotonic()
            left = descendants(proc.pid)
            if proc.poll() is None:
                # Its own session: the signal reaches the daemon and the children it forked, nothing else.
                os.killpg(proc.pid, sig)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
            _reap(left)
            with open(self.root / "stop.log", "a") as log:  # how long each daemon took to go
                log.write(f"{name}: {time.monotonic() - started:.1f} s\n")
        self.procs.clear()
        for cleanup in reversed(self.cleanups):
            cleanup()
        self.cleanups.clear()


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, start time) of every process below `pid`: daemons whose children left its session (Ray's workers)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        child = int(stat.parent.name)
        children.setdefault(int(fields[1]), []).append(child)
        starts[child] = fields[19]
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append((child, starts[child]))
            todo.append(child)
    return found


def _reap(processes: list[tuple[int, str]], timeout: float = 15.0) -> None:
    """Wait for a stopped daemon's descendants to leave; SIGKILL those (the same pid and start) that stay."""
    def alive() -> list[int]:
        out = []
        for pid, start in processes:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[19] == start and fields[0] != "Z":
                out.append(pid)
        return out

    deadline = time.monotonic() + timeout
    while alive() and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in alive():
        os.kill(pid, signal.SIGKILL)


def private_dir(prefix: str, owner: str) -> Path:
    """A folder in /tmp only `owner` (and root) can enter: pytest's tmp folders are root's alone."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    shutil.chown(path, owner, owner)
    return path


# --- PostgreSQL and the MLflow server ----------------------------------------------------------

def start_postgres(services: Services) -> dict[str, str]:
    """A private PostgreSQL cluster on 127.0.0.1; returns its port and the `mlflow` role's password."""
    ensure_packages(POSTGRES_PACKAGES)
    bin_dir = Path(sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))[-1])
    home = private_dir("pipeline-pg-", "postgres")
    services.cleanups.append(lambda: shutil.rmtree(home, ignore_errors=True))
    as_postgres = {"user": "postgres", "group": "postgres", "extra_groups": [], "cwd": home}
    # The superuser logs in only through the socket in `home` (0700, postgres'); TCP needs a password.
    subprocess.run([str(bin_dir / "initdb"), "-D", str(home / "data"), "-U", "postgres", "--auth-local=trust",
                    "--auth-host=scram-sha-256"], check=True, capture_output=True, **as_postgres)
    port = str(free_port())
    proc = services.start("postgres", [str(bin_dir / "postgres"), "-D", str(home / "data"), "-p", port, "-k", str(home),
                                       "-c", "listen_addresses=127.0.0.1"], stop_signal=signal.SIGINT, **as_postgres)
    psql = [str(bin_dir / "psql"), "-h", str(home), "-p", port, "-U", "postgres", "-v", "ON_ERROR_STOP=1", "-q"]
    wait_for("postgres", lambda: subprocess.run([*psql, "-c", "select 1"], capture_output=True, **as_postgres).returncode == 0,
             proc=proc, log=services.log("postgres"))
    password = secrets.token_urlsafe(16)
    # On stdin, not in argv; each statement on its own (CREATE DATABASE refuses a transaction).
    sql = (f"CREATE ROLE mlflow LOGIN PASSWORD '{password}';\nCREATE DATABASE mlflow OWNER mlflow;\n"
           "CREATE DATABASE mlflow_auth OWNER mlflow;\n")
    done = subprocess.run(psql, input=sql, capture_output=True, text=True, **as_postgres)
    if done.returncode != 0:
        raise RuntimeError(f"postgres: creating the mlflow role and databases failed: {done.stderr.strip()}")
    return {"port": port, "password": password}


def start_mlflow_server(services: Services, postgres: dict[str, str], artifacts: Path) -> dict[str, str]:
    """`mlflow server --app-name basic-auth` on PostgreSQL, serving artifacts from `artifacts`; and a job user.

    Every secret travels in the environment (PGPASSWORD for the database role,
    MLFLOW_AUTH_ADMIN_PASSWORD for the admin), never on a command line `ps` shows.
    """
    home = services.root / "mlflow-server"
    home.mkdir()
    # SQLAlchemy 2.1 maps postgresql:// to psycopg 3; psycopg2-binary is the driver the [server] extra installs.
    db = f"postgresql+psycopg2://mlflow@127.0.0.1:{postgres['port']}"
    (home / "basic_auth.ini").write_text(
        f"[mlflow]\ndefault_permission = READ\ndatabase_uri = {db}/mlflow_auth\nadmin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # Each request re-hashes the password (PBKDF2) otherwise: ~0.7 s a call on 2 busy cores.
        "auth_cache_ttl_seconds = 60\n")
    admin_password = secrets.token_urlsafe(16)
    env = {**os.environ, "PGPASSWORD": postgres["password"], "MLFLOW_AUTH_CONFIG_PATH": str(home / "basic_auth.ini"),
           "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password, "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
           # No GenAI job runner: eight more processes of ~230 MB that builds never use.
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(name, None)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    proc = services.start("mlflow-server", [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
                                            "--backend-store-uri", f"{db}/mlflow", "--artifacts-destination",
                                            str(artifacts), "--host", "127.0.0.1", "--port", str(port),
                                            "--workers", "2"], cwd=home, env=env)
    wait_for("mlflow server", lambda: urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200,
             timeout=120, proc=proc, log=services.log("mlflow-server"))
    user, password = "alice", secrets.token_urlsafe(16)
    create_user(uri, "admin", admin_password, user, password)
    return {"uri": uri, "user": user, "password": password, "admin_password": admin_password}


def create_user(uri: str, admin: str, admin_password: str, user: str, password: str) -> None:
    """The basic-auth app's admin adds a user (the REST call `get_app_client(...).create_user` makes)."""
    import base64
    import json

    body = json.dumps({"username": user, "password": password}).encode()
    request = urllib.request.Request(f"{uri}/api/2.0/mlflow/users/create", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    token = base64.b64encode(f"{admin}:{admin_password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    urllib.request.urlopen(request, timeout=30).close()


# --- SLURM ---------------------------------------------------------------------------------------

def start_munge(services: Services) -> None:
    """munged, SLURM's authentication, unless one already answers on this machine."""
    def works() -> bool:
        token = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        return token.returncode == 0 and subprocess.run(["unmunge"], input=token.stdout, capture_output=True,
                                                        timeout=10).returncode == 0
    if works():
        return
    for folder in ("/run/munge", "/var/lib/munge", "/var/log/munge"):
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.chown(folder, "munge", "munge")
    if not Path("/etc/munge/munge.key").is_file():
        subprocess.run(["mungekey", "--create"], check=True, user="munge", group="munge", extra_groups=[])
    proc = services.start("munged", ["munged", "--foreground"], user="munge", group="munge", extra_groups=[])
    wait_for("munged", works, proc=proc, log=services.log("munged"))


def start_mariadb(services: Services) -> dict[str, str]:
    """A private MariaDB for slurmdbd (SLURM's accounting needs MySQL/MariaDB)."""
    home = private_dir("pipeline-mariadb-", "mysql")
    services.cleanups.append(lambda: shutil.rmtree(home, ignore_errors=True))
    subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={home}/data", "--user=mysql",
                    "--auth-root-authentication-method=socket", "--skip-test-db"], check=True, capture_output=True)
    port, sock = str(free_port()), f"{home}/mysqld.sock"
    proc = services.start("mariadb", ["mariadbd", "--no-defaults", f"--datadir={home}/data", f"--socket={sock}",
                                      f"--port={port}", "--bind-address=127.0.0.1", "--user=mysql",
                                      f"--pid-file={home}/mariadb.pid", "--innodb-buffer-pool-size=64M"])
    client = ["mariadb", "--no-defaults", f"--socket={sock}", "-u", "root"]
    wait_for("mariadb", lambda: subprocess.run([*client, "-e", "select 1"], capture_output=True).returncode == 0,
             proc=proc, log=services.log("mariadb"))
    password = secrets.token_urlsafe(16)
    sql = (f"CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{password}';\n"
           "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';\n")
    subprocess.run(client, input=sql, text=True, check=True, capture_output=True)
    return {"port": port, "password": password}


SLURM_CONF = """\
ClusterName=pipeline
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
# No cgroups (containers rarely give them): processes are tracked by their parent pid.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={dbd_port}
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# SIGTERM, then SIGKILL after this many seconds: a cancelled job's time to record itself KILLED.
KillWait=20
MinJobAge=300
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""

SLURMDBD_CONF = """\
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={dbd_port}
SlurmUser=root
PidFile={root}/slurmdbd.pid
LogFile={root}/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={db_port}
StorageUser=slurm
StoragePass={db_password}
StorageLoc=slurm_acct_db
"""


def start_slurm(services: Services) -> dict[str, str]:
    """A one-node SLURM cluster on this machine (slurmctld, slurmd, slurmdbd); returns the env its clients need."""
    ensure_packages(SLURM_PACKAGES)
    start_munge(services)
    db = start_mariadb(services)
    root = Path(tempfile.mkdtemp(prefix="pipeline-slurm-"))
    services.cleanups.append(lambda: shutil.rmtree(root, ignore_errors=True))
    for folder in ("state", "spool"):
        (root / folder).mkdir()
    values = {"host": socket.gethostname().split(".")[0], "root": root, "cpus": os.cpu_count() or 1,
              "ctld_port": free_port(), "slurmd_port": free_port(), "dbd_port": free_port(),
              "db_port": db["port"], "db_password": db["password"]}
    (root / "slurm.conf").write_text(SLURM_CONF.format(**values))
    (root / "slurmdbd.conf").write_text(SLURMDBD_CONF.format(**values))
    (root / "slurmdbd.conf").chmod(0o600)  # slurmdbd refuses a config others can read (it holds a password)
    env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
    dbd = services.start("slurmdbd", ["slurmdbd", "-D"], env=env)
    wait_for("slurmdbd", lambda: _connects(values["dbd_port"]), proc=dbd, log=root / "slurmdbd.log")
    subprocess.run(["sacctmgr", "-i", "add", "cluster", "pipeline"], env=env, capture_output=True, timeout=60)
    ctld = services.start("slurmctld", ["slurmctld", "-D", "-i"], env=env)
    wait_for("slurmctld", lambda: _connects(values["ctld_port"]), proc=ctld, log=root / "slurmctld.log")
    slurmd = services.start("slurmd", ["slurmd", "-D"], env=env)
    wait_for("slurmd (node idle)", lambda: "idle" in subprocess.run(
        ["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=10).stdout,
        proc=slurmd, log=root / "slurmd.log")
    return {"SLURM_CONF": env["SLURM_CONF"], "root": str(root)}


def _connects(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# --- Ray -----------------------------------------------------------------------------------------

def start_ray(services: Services, num_cpus: int = 2, **env_vars: str) -> str:
    """`ray start --head --block`: a local Ray cluster (its workers get `env_vars`); returns its address."""
    ray = VENV_BIN / "ray"
    if not ray.is_file():
        raise Unavailable("needs Ray: pip install -e '.[ray]'")
    temp = Path(tempfile.mkdtemp(prefix="ray-"))  # short: Ray's socket paths must fit 107 bytes
    services.cleanups.append(lambda: shutil.rmtree(temp, ignore_errors=True))
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **env_vars}
    proc = services.start("ray", [str(ray), "start", "--head", "--block", f"--port={port}", f"--num-cpus={num_cpus}",
                                  "--num-gpus=0", "--include-dashboard=false", f"--temp-dir={temp}",
                                  "--node-ip-address=127.0.0.1", "--disable-usage-stats"], env=env,
                          # A throwaway cluster: once it ran jobs, `ray start --block` took 30 s to obey SIGTERM.
                          stop_signal=signal.SIGKILL)
    address = f"127.0.0.1:{port}"
    wait_for("ray", lambda: subprocess.run([str(ray), "status", f"--address={address}"], capture_output=True,
                                           env=env, timeout=30).returncode == 0,
             timeout=120, proc=proc, log=services.log("ray"))
    return address
