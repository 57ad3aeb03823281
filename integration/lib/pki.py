"""Test PKI made with `strait-testcerts` (rcgen): CAs, server and client certificates."""

import os
import subprocess
from pathlib import Path

from .edge import default_target_dir

SPIFFE_ORDERS = "spiffe://example.org/ns/shop/sa/orders"
SPIFFE_BILLING = "spiffe://example.org/ns/shop/sa/billing"
SPIFFE_OTHER_DOMAIN = "spiffe://other.org/ns/shop/sa/orders"
# The trust domains the test CA is bound to by default (other.org federated with the same CA, so
# authorization tests can tell the two domains' principals apart).
TRUST_DOMAINS = ("example.org", "other.org")


def testcerts_bin() -> str:
    path = os.environ.get("STRAIT_TESTCERTS_BIN") or str(default_target_dir() / "debug" / "strait-testcerts")
    if not Path(path).is_file():
        raise RuntimeError(f"strait-testcerts not found at {path}: build it with `cargo build -p strait-testcerts`")
    return path


class Pki:
    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def _run(self, *args: str) -> None:
        subprocess.run([testcerts_bin(), *args, "--dir", str(self.dir)], check=True, capture_output=True)

    def ca(self, name: str) -> Path:
        self._run("ca", "--name", name)
        return self.pem(name)

    def leaf(self, name: str, ca: str = "ca", dns=(), ips=(), uris=(), cn: str | None = None,
             valid_from_days: int = -1, valid_days: int = 30) -> Path:
        args = ["leaf", "--ca", ca, "--name", name, "--valid-from-days", str(valid_from_days),
                "--valid-days", str(valid_days)]
        for d in dns:
            args += ["--dns", d]
        for i in ips:
            args += ["--ip", i]
        for u in uris:
            args += ["--uri", u]
        if cn:
            args += ["--cn", cn]
        self._run(*args)
        return self.pem(name)

    def pem(self, name: str) -> Path:
        return self.dir / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.dir / f"{name}.key"

    def server_tls(self, name: str = "server", client_ca: str | None = "ca", client_auth: str = "required",
                   trust_domains=TRUST_DOMAINS, **extra) -> dict:
        """The CA verifies certificates without a SPIFFE ID (`client_ca`) and, bound to each of
        `trust_domains`, those whose SPIFFE ID names that domain: the edge accepts a SPIFFE ID only
        from a bundle bound to its trust domain."""
        cfg = {"cert": str(self.pem(name)), "key": str(self.key(name)), "client_auth": client_auth, **extra}
        if client_ca:
            cfg["client_ca"] = str(self.pem(client_ca))
            cfg["client_trust_bundles"] = [{"trust_domain": d, "pem_file": str(self.pem(client_ca))}
                                           for d in trust_domains]
        return cfg

    def confluent_ssl(self, client: str | None, ca: str = "ca") -> dict:
        cfg = {"security.protocol": "SSL", "ssl.ca.location": str(self.pem(ca))}
        if client:
            cfg.update({"ssl.certificate.location": str(self.pem(client)),
                        "ssl.key.location": str(self.key(client))})
        return cfg

    def kafka_python_ssl(self, client: str | None, ca: str = "ca") -> dict:
        cfg = {"security_protocol": "SSL", "ssl_cafile": str(self.pem(ca)), "ssl_check_hostname": True}
        if client:
            cfg.update({"ssl_certfile": str(self.pem(client)), "ssl_keyfile": str(self.key(client))})
        return cfg


def standard_pki(directory: Path, server_dns=("localhost",)) -> Pki:
    """CA, a server certificate for localhost/127.0.0.1, and the clients the tests use."""
    pki = Pki(directory)
    pki.ca("ca")
    pki.ca("otherca")
    pki.leaf("server", dns=server_dns, ips=["127.0.0.1"])
    pki.leaf("orders", uris=[SPIFFE_ORDERS])
    pki.leaf("billing", uris=[SPIFFE_BILLING])
    pki.leaf("expired", uris=[SPIFFE_ORDERS], valid_from_days=-10, valid_days=5)
    pki.leaf("not-yet-valid", uris=[SPIFFE_ORDERS], valid_from_days=5, valid_days=5)
    pki.leaf("rogue", ca="otherca", uris=[SPIFFE_ORDERS])
    return pki
