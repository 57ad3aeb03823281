//! SPIFFE ID globs: `*` stays within one path segment, `**` crosses them,
//! so `spiffe://d/edge/*` never matches `spiffe://d/edge/a/b`.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob(String);

impl Glob {
    /// Checks the syntax (the rule AccessRule specs are validated with).
    pub fn new(pattern: &str) -> Result<Glob, String> {
        strait_control_state::spec::check_spiffe_glob(pattern)?;
        Ok(Glob(pattern.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn matches(&self, id: &str) -> bool {
        strait_control_state::spec::spiffe_glob_matches(&self.0, id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_table() {
        let cases = [
            ("spiffe://d/edge/*", "spiffe://d/edge/e1", true),
            ("spiffe://d/edge/*", "spiffe://d/edge/", true),
            ("spiffe://d/edge/*", "spiffe://d/edge/a/b", false),
            ("spiffe://d/edge/*", "spiffe://d/edgex/e1", false),
            ("spiffe://d/edge/*", "spiffe://other/edge/e1", false),
            ("spiffe://d/**", "spiffe://d/ns/a/sa/b", true),
            ("spiffe://d/ns/*/sa/ops-*", "spiffe://d/ns/x/sa/ops-1", true),
            (
                "spiffe://d/ns/*/sa/ops-*",
                "spiffe://d/ns/x/y/sa/ops-1",
                false,
            ),
            ("spiffe://d/admin/alice", "spiffe://d/admin/alice", true),
            ("spiffe://d/admin/alice", "spiffe://d/admin/alice2", false),
            ("spiffe://*/admin/alice", "spiffe://evil/admin/alice", true),
            ("spiffe://*/admin/alice", "spiffe://a/b/admin/alice", false),
        ];
        for (p, id, want) in cases {
            assert_eq!(Glob::new(p).unwrap().matches(id), want, "{p} ~ {id}");
        }
        assert!(Glob::new("example.org/admin/*").is_err());
        assert!(Glob::new("spiffe://").is_err());
        assert!(Glob::new("spiffe://d/a b").is_err());
    }
}
