"""A site in its own network namespace, joined to the root namespace by a veth pair that the test
creates (and removes): the root side is 10.201.X.1/30, the namespace side 10.201.X.2/30. Processes run
inside with `ip netns exec`; nothing leaves the machine."""

import itertools
import os
import subprocess

_count = itertools.count()


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


class SiteNamespace:
    def __init__(self, tag: str):
        k = next(_count)
        pid = os.getpid()
        self.name = f"strait-{tag}-{pid}-{k}"
        # Interface names have at most 15 characters.
        self.outside_if, self.inside_if = f"sv{pid % 100000}{k}r", f"sv{pid % 100000}{k}n"
        subnet = (pid * 7 + k) % 250 + 2
        self.outside, self.inside = f"10.201.{subnet}.1", f"10.201.{subnet}.2"

    def __enter__(self) -> "SiteNamespace":
        _ip("netns", "add", self.name)
        try:
            _ip("link", "add", self.outside_if, "type", "veth", "peer", "name", self.inside_if)
            _ip("link", "set", self.inside_if, "netns", self.name)
            _ip("addr", "add", f"{self.outside}/30", "dev", self.outside_if)
            _ip("link", "set", self.outside_if, "up")
            _ip("-n", self.name, "addr", "add", f"{self.inside}/30", "dev", self.inside_if)
            _ip("-n", self.name, "link", "set", self.inside_if, "up")
            _ip("-n", self.name, "link", "set", "lo", "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        # Deleting the namespace deletes its end of the pair, and with it the other end.
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)
        subprocess.run(["ip", "link", "del", self.outside_if], capture_output=True, timeout=10)
