"""The strait-control binary under test, as the mesh's certificate authority: 1 or 3 nodes on mTLS
with `--trust-domain` and `--ca-seal-key-file`, and straitctl as an admin (token create, cert issue,
ca bundle). The bootstrap PKI (the nodes' first serving certificate, the admin's certificate) comes
from `strait-testcerts`; everything else is issued by the control plane itself."""

import subprocess
from pathlib import Path

from .edge import default_target_dir
from .pki import Pki
from .ports import free_port
from .procs import Proc
from .wait import wait_for


def binary(name: str) -> str:
    path = default_target_dir() / "debug" / name
    assert path.is_file(), f"{path} missing: cargo build --workspace --bins"
    return str(path)


class ControlPlane:
    """`nodes` strait-control processes sharing one seal key file (development sealing)."""

    def __init__(self, directory: Path, logs: Path, trust_domain: str = "example.org", nodes: int = 1,
                 extra_args: tuple[str, ...] = ()):
        assert nodes in (1, 3), "1 or 3 nodes"
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.logs = Path(logs)
        self.trust_domain = trust_domain
        self.pki = Pki(self.dir / "bootstrap")
        self.pki.ca("ca")
        # One bootstrap certificate for every node: a control-node SPIFFE ID (Raft accepts only
        # /control/* peers) and the names clients dial.
        self.pki.leaf("node", ips=["127.0.0.1"], dns=["localhost"], uris=[f"spiffe://{trust_domain}/control/node"])
        self.pki.leaf("admin", uris=[f"spiffe://{trust_domain}/admin/ops"])
        self.seal_key = self.dir / "seal.key"
        self.addrs = [f"127.0.0.1:{free_port()}" for _ in range(nodes)]
        self.procs: list[Proc] = []
        peers = ",".join(f"{i + 1}={a}" for i, a in enumerate(self.addrs))
        for i, addr in enumerate(self.addrs):
            argv = [binary("strait-control"), "--id", str(i + 1), "--listen", addr,
                    "--data-dir", str(self.dir / f"data-{i + 1}"),
                    "--tls-cert", str(self.pki.pem("node")), "--tls-key", str(self.pki.key("node")),
                    "--tls-client-ca", str(self.pki.pem("ca")), "--trust-domain", trust_domain,
                    "--ca-seal-key-file", str(self.seal_key),
                    "--admin-identity", f"spiffe://{trust_domain}/admin/*", *extra_args]
            argv += ["--dev"] if nodes == 1 else ["--peers", peers]
            self.procs.append(Proc(f"control-{i + 1}-{addr.rsplit(':', 1)[1]}", argv, self.logs))

    @property
    def endpoints(self) -> str:
        return ",".join(self.addrs)

    def start(self, timeout: float = 60.0) -> "ControlPlane":
        for i, p in enumerate(self.procs):
            p.start()
            if i == 0:
                # The first node creates the seal key file (mode 0600); the others read the same one.
                wait_for(self.seal_key.exists, 10, what="the CA seal key file")
        wait_for(lambda: self.ctl("members").returncode == 0, timeout, what="the control plane answering")
        # The leader creates the CA's first generation; until then the bundle is empty.
        wait_for(lambda: self.ctl("ca", "bundle").returncode == 0, timeout, what="the CA's first root")
        return self

    def stop(self) -> None:
        for p in self.procs:
            p.stop()

    def ctl(self, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        """straitctl as the admin (`spiffe://D/admin/ops`), verifying the nodes against the bootstrap CA."""
        result = subprocess.run(
            [binary("straitctl"), "--endpoints", self.endpoints, "--ca", str(self.pki.pem("ca")),
             "--cert", str(self.pki.pem("admin")), "--key", str(self.pki.key("admin")), *args],
            capture_output=True, text=True, timeout=60)
        if check:
            assert result.returncode == 0, f"straitctl {' '.join(args)}: {result.stderr}"
        return result

    def token_create(self, spiffe_id_pattern: str, ttl: str = "10m", uses: int = 1) -> str:
        """`straitctl token create`: the join token (its first output line)."""
        out = self.ctl("token", "create", "--spiffe-id", spiffe_id_pattern, "--ttl", ttl, "--uses", str(uses),
                       check=True).stdout
        return out.strip().splitlines()[0].strip()

    def cert_issue(self, spiffe_id: str, out: Path, ttl: str = "10m") -> Path:
        """`straitctl cert issue`: writes cert.pem, key.pem (0600) and bundle.pem into `out`."""
        self.ctl("cert", "issue", "--spiffe-id", spiffe_id, "--ttl", ttl, "--out", str(out), check=True)
        return Path(out)

    def ca_bundle(self, out: Path) -> Path:
        """`straitctl ca bundle --out FILE`: the roots that verify certificates the CA issued."""
        self.ctl("ca", "bundle", "--out", str(out), check=True)
        return Path(out)
