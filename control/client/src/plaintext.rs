//! The rule for running the control-plane connection without TLS: only when
//! asked for explicitly, and only when no byte leaves the machine.

use std::net::IpAddr;

/// Whether `addr` (`host:port`, `[v6]:port`, a bare host, or a URI such as
/// `http://host:port`) names this machine: a loopback IP or `localhost`.
pub fn is_loopback(addr: &str) -> bool {
    let addr = addr.split_once("://").map_or(addr, |(_, rest)| rest);
    let authority = addr.split('/').next().unwrap_or(addr);
    let host = if let Some(rest) = authority.strip_prefix('[') {
        rest.split_once(']').map_or(rest, |(h, _)| h)
    } else {
        match authority.rsplit_once(':') {
            // A bare IPv6 address has several colons and no port.
            Some((h, _)) if !h.contains(':') => h,
            _ => authority,
        }
    };
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Checks that plaintext is allowed for `addrs`: the caller passed
/// `--insecure-plaintext` and every address is loopback. The error names
/// what is wrong, for the binary to print.
pub fn check_plaintext<'a>(
    insecure_plaintext: bool,
    what: &str,
    addrs: impl IntoIterator<Item = &'a str>,
) -> Result<(), String> {
    if !insecure_plaintext {
        return Err(format!(
            "{what}: no TLS configured; give the TLS flags, or --insecure-plaintext for a \
             control plane on this machine only"
        ));
    }
    let remote: Vec<&str> = addrs.into_iter().filter(|a| !is_loopback(a)).collect();
    if !remote.is_empty() {
        return Err(format!(
            "{what}: --insecure-plaintext only works when every address is loopback; not loopback: {}",
            remote.join(", ")
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_addresses() {
        let cases = [
            ("127.0.0.1:7001", true),
            ("127.1.2.3:7001", true),
            ("localhost:7001", true),
            ("LOCALHOST", true),
            ("[::1]:7001", true),
            ("::1", true),
            ("http://127.0.0.1:7001", true),
            ("https://localhost:7001/", true),
            ("10.0.0.1:7001", false),
            ("0.0.0.0:7001", false),
            ("[::]:7001", false),
            ("control.example.org:7001", false),
            ("localhost.example.org:7001", false),
            ("http://10.0.0.1:7001", false),
            ("", false),
        ];
        for (addr, want) in cases {
            assert_eq!(is_loopback(addr), want, "{addr}");
        }
    }

    #[test]
    fn plaintext_rule() {
        assert!(check_plaintext(true, "x", ["127.0.0.1:1", "localhost:2"]).is_ok());
        let e = check_plaintext(false, "straitctl", ["127.0.0.1:1"]).unwrap_err();
        assert!(e.contains("--insecure-plaintext"), "{e}");
        let e = check_plaintext(true, "straitctl", ["127.0.0.1:1", "10.1.1.1:2"]).unwrap_err();
        assert!(e.ends_with("not loopback: 10.1.1.1:2"), "{e}");
    }
}
