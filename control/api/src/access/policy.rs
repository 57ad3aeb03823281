//! The pure decision: caller + operation + resource -> allow or deny, with
//! the reason. Deny by default: what no binding grants is refused.

use std::fmt;

use strait_control_state::spec::{AccessRole, AccessRuleSpec};
use strait_control_state::Kind;

use super::glob::Glob;
use super::identity::{Caller, SpiffeId};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ControlMethod {
    Apply,
    /// An Apply that must not overwrite (`expected_revision: 0`): how an
    /// edge registers its own Edge resource.
    Create,
    Get,
    List,
    Watch,
    Delete,
    UpdateStatus,
    Members,
    AddMember,
    RemoveMember,
    Status,
    SetPartitioned,
    /// Switch a FailoverGroup's active cluster: admin only.
    Failover,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RaftMethod {
    Send,
}

/// Methods of `strait.control.v1.Identity` (the service lives elsewhere; its
/// handlers ask the [`super::Authorizer`] with these).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdentityMethod {
    /// No certificate needed: the join token is the credential.
    Join,
    /// Any authenticated SPIFFE caller; the handler checks that the CSR
    /// asks for the caller's own ID.
    Renew,
    Issue,
    CreateJoinToken,
    /// Public roots: no certificate needed.
    TrustBundle,
    /// Admin: start the next CA generation now.
    RotateCa,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    Control(ControlMethod),
    Raft(RaftMethod),
    Identity(IdentityMethod),
}

impl Operation {
    /// `Service/Method`, as in messages, audit records and metric labels.
    pub fn as_str(self) -> &'static str {
        use ControlMethod as C;
        use IdentityMethod as I;
        match self {
            Operation::Control(m) => match m {
                C::Apply | C::Create => "Control/Apply",
                C::Get => "Control/Get",
                C::List => "Control/List",
                C::Watch => "Control/Watch",
                C::Delete => "Control/Delete",
                C::UpdateStatus => "Control/UpdateStatus",
                C::Members => "Control/Members",
                C::AddMember => "Control/AddMember",
                C::RemoveMember => "Control/RemoveMember",
                C::Status => "Control/Status",
                C::SetPartitioned => "Control/SetPartitioned",
                C::Failover => "Control/Failover",
            },
            Operation::Raft(RaftMethod::Send) => "Raft/Send",
            Operation::Identity(m) => match m {
                I::Join => "Identity/Join",
                I::Renew => "Identity/Renew",
                I::Issue => "Identity/Issue",
                I::CreateJoinToken => "Identity/CreateJoinToken",
                I::TrustBundle => "Identity/TrustBundle",
                I::RotateCa => "Identity/RotateCa",
            },
        }
    }

    /// Writes are audited when they succeed too, not only when refused.
    pub fn is_write(self) -> bool {
        use ControlMethod as C;
        matches!(
            self,
            Operation::Control(
                C::Apply
                    | C::Create
                    | C::Delete
                    | C::UpdateStatus
                    | C::AddMember
                    | C::RemoveMember
                    | C::SetPartitioned
                    | C::Failover
            ) | Operation::Identity(
                IdentityMethod::Join
                    | IdentityMethod::Renew
                    | IdentityMethod::Issue
                    | IdentityMethod::CreateJoinToken
                    | IdentityMethod::RotateCa
            )
        )
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What is asked: an operation, on a kind or one resource if it has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access<'a> {
    pub op: Operation,
    pub kind: Option<Kind>,
    pub name: Option<&'a str>,
}

impl<'a> Access<'a> {
    pub fn op(op: Operation) -> Self {
        Access {
            op,
            kind: None,
            name: None,
        }
    }

    pub fn kind(op: Operation, kind: Option<Kind>) -> Self {
        Access {
            op,
            kind,
            name: None,
        }
    }

    pub fn resource(op: Operation, kind: Kind, name: &'a str) -> Self {
        Access {
            op,
            kind: Some(kind),
            name: Some(name),
        }
    }
}

impl fmt::Display for Access<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.op.as_str())?;
        match (self.kind, self.name) {
            (Some(k), Some(n)) => write!(f, " {k}/{n}"),
            (Some(k), None) => write!(f, " {k}"),
            _ => Ok(()),
        }
    }
}

/// Kinds that hold credentials (a join token's hash, a sealed CA key) or
/// the CA's records: admin only. The match has no wildcard arm so that a
/// new kind cannot be added without deciding this.
pub fn is_secret(kind: Kind) -> bool {
    match kind {
        Kind::KafkaCluster
        | Kind::Edge
        | Kind::VirtualCluster
        | Kind::AuthorizationPolicy
        | Kind::EncryptionPolicy
        | Kind::KmsRealm
        | Kind::TrustBundle
        | Kind::FailoverGroup
        | Kind::AccessRule
        | Kind::DenyList
        | Kind::KmsBroker
        | Kind::MeshPeer
        | Kind::KmsGrant
        | Kind::KekShred => false,
        Kind::JoinToken | Kind::IssuedCertificate | Kind::CertificateAuthority => true,
    }
}

/// Kinds an edge may read at all (which resources of them, see
/// [`super::scope`]). No wildcard arm, as in [`is_secret`].
pub fn edge_reads(kind: Kind) -> bool {
    match kind {
        Kind::KafkaCluster
        | Kind::Edge
        | Kind::VirtualCluster
        | Kind::AuthorizationPolicy
        | Kind::EncryptionPolicy
        | Kind::KmsRealm
        | Kind::TrustBundle
        | Kind::FailoverGroup
        | Kind::DenyList
        | Kind::MeshPeer
        // Every edge refuses a shredded KEK at once.
        | Kind::KekShred => true,
        Kind::AccessRule
        | Kind::JoinToken
        | Kind::IssuedCertificate
        | Kind::CertificateAuthority
        | Kind::KmsBroker
        // Between kms-brokers and their callers; not an edge's business.
        | Kind::KmsGrant => false,
    }
}

/// Kinds a KMS broker may read. No wildcard arm, as in [`is_secret`].
pub fn kms_broker_reads(kind: Kind) -> bool {
    match kind {
        Kind::KmsRealm | Kind::TrustBundle | Kind::DenyList | Kind::KmsGrant | Kind::KekShred => {
            true
        }
        Kind::KafkaCluster
        | Kind::Edge
        | Kind::VirtualCluster
        | Kind::AuthorizationPolicy
        | Kind::EncryptionPolicy
        | Kind::FailoverGroup
        | Kind::AccessRule
        | Kind::JoinToken
        | Kind::IssuedCertificate
        | Kind::CertificateAuthority
        | Kind::KmsBroker
        | Kind::MeshPeer => false,
    }
}

/// The roles one caller holds (several bindings may match one ID).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    pub admin: bool,
    pub reader: bool,
    pub kms_broker: bool,
    /// The broker's name (last segment of its ID) when it holds the
    /// kms_broker role: the one KmsBroker resource whose status it writes.
    pub kms_broker_name: Option<String>,
    pub control: bool,
    /// The edge's name (last segment of its ID) when it holds the edge role.
    pub edge: Option<String>,
}

impl Grants {
    pub fn everything() -> Grants {
        Grants {
            admin: true,
            ..Grants::default()
        }
    }

    fn add(&mut self, role: AccessRole, id: &SpiffeId) {
        match role {
            AccessRole::Admin => self.admin = true,
            AccessRole::Reader => self.reader = true,
            AccessRole::KmsBroker => {
                self.kms_broker = true;
                self.kms_broker_name = Some(id.name().to_string());
            }
            AccessRole::Control => self.control = true,
            AccessRole::Edge => self.edge = Some(id.name().to_string()),
        }
    }

    /// Whether every resource of `kind` may be read, regardless of content.
    pub fn reads_all_of(&self, kind: Kind) -> bool {
        self.admin
            || (self.reader && !is_secret(kind))
            || (self.kms_broker && kms_broker_reads(kind))
    }

    /// Whether some resources of `kind` may be read.
    pub fn reads_some_of(&self, kind: Kind) -> bool {
        self.reads_all_of(kind) || (self.edge.is_some() && edge_reads(kind))
    }

    /// The edge whose scope must be computed from the state, when reads are
    /// not already covered by a wider role.
    pub fn scoped_edge(&self) -> Option<&str> {
        if self.admin || self.reader {
            None
        } else {
            self.edge.as_deref()
        }
    }

    fn allows(&self, a: &Access<'_>) -> bool {
        use ControlMethod as C;
        match a.op {
            Operation::Raft(RaftMethod::Send) => self.control,
            Operation::Identity(IdentityMethod::Join | IdentityMethod::TrustBundle) => true,
            // Any authenticated caller; the handler binds the CSR to the ID.
            Operation::Identity(IdentityMethod::Renew) => true,
            Operation::Identity(
                IdentityMethod::Issue | IdentityMethod::CreateJoinToken | IdentityMethod::RotateCa,
            ) => self.admin,
            Operation::Control(_) if self.admin => true,
            Operation::Control(C::Get | C::List | C::Watch) => match a.kind {
                Some(k) => self.reads_some_of(k),
                // Every kind: the listing is filtered to what may be read.
                None => self.reader || self.kms_broker || self.edge.is_some(),
            },
            Operation::Control(C::Members | C::Status) => self.reader,
            // Each writes only its own registration and status.
            Operation::Control(C::UpdateStatus | C::Create) => match (a.kind, a.name) {
                (Some(Kind::Edge), Some(n)) => self.edge.as_deref() == Some(n),
                (Some(Kind::KmsBroker), Some(n)) => self.kms_broker_name.as_deref() == Some(n),
                _ => false,
            },
            Operation::Control(
                C::Apply
                | C::Delete
                | C::AddMember
                | C::RemoveMember
                | C::SetPartitioned
                | C::Failover,
            ) => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow(Grants),
    /// gRPC UNAUTHENTICATED: no usable identity.
    Unauthenticated(String),
    /// gRPC PERMISSION_DENIED: a known identity that may not do this.
    Denied(String),
}

/// The bindings in force besides AccessRule resources: `--admin-identity`
/// globs (always effective, so a bad rule cannot lock the operator out) and
/// the roles the trust domain's ID scheme implies.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    bindings: Vec<(Glob, AccessRole)>,
}

impl Policy {
    pub fn new(trust_domain: Option<&str>, admins: Vec<Glob>) -> Result<Policy, String> {
        let mut bindings: Vec<(Glob, AccessRole)> =
            admins.into_iter().map(|g| (g, AccessRole::Admin)).collect();
        if let Some(d) = trust_domain {
            if d.is_empty() || d.contains(['/', ':', '*']) {
                return Err(format!(
                    "'{d}' is not a trust domain (a name like example.org)"
                ));
            }
            for (path, role) in [
                ("edge", AccessRole::Edge),
                ("kms-broker", AccessRole::KmsBroker),
                ("control", AccessRole::Control),
            ] {
                bindings.push((Glob::new(&format!("spiffe://{d}/{path}/*"))?, role));
            }
        }
        Ok(Policy { bindings })
    }

    pub fn grants(&self, id: &SpiffeId, rules: &[AccessRuleSpec]) -> Grants {
        let mut g = Grants::default();
        for (glob, role) in &self.bindings {
            if glob.matches(id.as_str()) {
                g.add(*role, id);
            }
        }
        for rule in rules {
            if rule
                .identities
                .iter()
                .any(|p| Glob::new(p).is_ok_and(|g| g.matches(id.as_str())))
            {
                g.add(rule.role, id);
            }
        }
        g
    }

    pub fn decide(
        &self,
        caller: &Caller,
        access: &Access<'_>,
        rules: &[AccessRuleSpec],
    ) -> Decision {
        let anyone = matches!(
            access.op,
            Operation::Identity(IdentityMethod::Join | IdentityMethod::TrustBundle)
        );
        match caller {
            Caller::InsecureLocal => Decision::Allow(Grants {
                control: true,
                ..Grants::everything()
            }),
            Caller::Anonymous { .. } if anyone => Decision::Allow(Grants::default()),
            Caller::Anonymous { why } => Decision::Unauthenticated(format!(
                "{access} needs a client certificate with a SPIFFE ID: {why}"
            )),
            Caller::Local(_) => Decision::Denied(denied(caller, access)),
            Caller::Spiffe(id) => {
                let g = self.grants(id, rules);
                if g.allows(access) {
                    Decision::Allow(g)
                } else {
                    Decision::Denied(denied(caller, access))
                }
            }
        }
    }
}

/// The PERMISSION_DENIED message: who may not do what.
pub fn denied(caller: &Caller, access: &Access<'_>) -> String {
    format!("{caller} may not {access}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use ControlMethod as C;

    fn id(s: &str) -> Caller {
        Caller::Spiffe(SpiffeId::parse(s).unwrap())
    }

    fn ctl(m: ControlMethod) -> Operation {
        Operation::Control(m)
    }

    #[derive(Debug, PartialEq)]
    enum Want {
        Allow,
        Deny,
        Unauth,
    }

    #[test]
    fn decision_table() {
        let policy = Policy::new(
            Some("example.org"),
            vec![Glob::new("spiffe://example.org/admin/*").unwrap()],
        )
        .unwrap();
        let rules = vec![AccessRuleSpec {
            identities: vec!["spiffe://example.org/ns/ops/sa/*".into()],
            role: AccessRole::Reader,
        }];
        let admin = id("spiffe://example.org/admin/alice");
        let edge = id("spiffe://example.org/edge/e1");
        let kms = id("spiffe://example.org/kms-broker/k1");
        let node = id("spiffe://example.org/control/1");
        let reader = id("spiffe://example.org/ns/ops/sa/dash");
        let stranger = id("spiffe://example.org/ns/app/sa/orders");
        let foreign_edge = id("spiffe://other.org/edge/e1");
        let nocert = Caller::Anonymous {
            why: "no client certificate",
        };
        // Shorthands, so that each case stays one row of the table.
        let kind = |m: C, k: Kind| Access::kind(ctl(m), Some(k));
        let res = |m: C, k: Kind, name: &'static str| Access::resource(ctl(m), k, name);
        let ident = |m: IdentityMethod| Access::op(Operation::Identity(m));
        let raft = || Access::op(Operation::Raft(RaftMethod::Send));
        let vc = res(C::Apply, Kind::VirtualCluster, "vc1");
        let fg_failover = res(C::Failover, Kind::FailoverGroup, "orders");
        use Want::*;
        let cases: Vec<(&Caller, Access, Want)> = vec![
            (&admin, vc, Allow),
            (&admin, kind(C::List, Kind::AccessRule), Allow),
            (&admin, Access::op(ctl(C::AddMember)), Allow),
            (&admin, raft(), Deny),
            (&admin, ident(IdentityMethod::Issue), Allow),
            (&edge, vc, Deny),
            (&edge, res(C::Delete, Kind::VirtualCluster, "vc1"), Deny),
            (&edge, kind(C::Watch, Kind::VirtualCluster), Allow),
            (&edge, Access::kind(ctl(C::Watch), None), Allow),
            (&edge, kind(C::List, Kind::AccessRule), Deny),
            (&edge, res(C::UpdateStatus, Kind::Edge, "e1"), Allow),
            (&edge, res(C::UpdateStatus, Kind::Edge, "e2"), Deny),
            (
                &edge,
                res(C::UpdateStatus, Kind::VirtualCluster, "e1"),
                Deny,
            ),
            (&edge, res(C::Create, Kind::Edge, "e1"), Allow),
            (&edge, res(C::Apply, Kind::Edge, "e1"), Deny),
            (&edge, Access::op(ctl(C::Members)), Deny),
            (&edge, raft(), Deny),
            (&edge, ident(IdentityMethod::Renew), Allow),
            (&edge, ident(IdentityMethod::Issue), Deny),
            (&foreign_edge, Access::kind(ctl(C::Watch), None), Deny),
            (&kms, kind(C::List, Kind::KmsRealm), Allow),
            (&kms, kind(C::Watch, Kind::TrustBundle), Allow),
            (&kms, kind(C::List, Kind::VirtualCluster), Deny),
            (&kms, res(C::UpdateStatus, Kind::Edge, "k1"), Deny),
            (&kms, kind(C::Watch, Kind::DenyList), Allow),
            (&kms, res(C::UpdateStatus, Kind::KmsBroker, "k1"), Allow),
            (&kms, res(C::Create, Kind::KmsBroker, "k1"), Allow),
            (&kms, res(C::UpdateStatus, Kind::KmsBroker, "k2"), Deny),
            (&kms, res(C::Apply, Kind::KmsBroker, "k1"), Deny),
            (&kms, kind(C::List, Kind::KmsBroker), Deny),
            (&edge, res(C::UpdateStatus, Kind::KmsBroker, "e1"), Deny),
            (&edge, res(C::Create, Kind::KmsBroker, "e1"), Deny),
            (&node, raft(), Allow),
            (&node, kind(C::List, Kind::KafkaCluster), Deny),
            (&reader, kind(C::List, Kind::AccessRule), Allow),
            (&reader, Access::op(ctl(C::Status)), Allow),
            (&reader, vc, Deny),
            (&stranger, Access::kind(ctl(C::List), None), Deny),
            (&stranger, ident(IdentityMethod::TrustBundle), Allow),
            (&nocert, Access::kind(ctl(C::List), None), Unauth),
            (&nocert, raft(), Unauth),
            (&nocert, ident(IdentityMethod::Join), Allow),
            (&nocert, ident(IdentityMethod::Renew), Unauth),
            (&admin, fg_failover, Allow),
            (&edge, fg_failover, Deny),
            (&kms, fg_failover, Deny),
            (&reader, fg_failover, Deny),
            (&node, fg_failover, Deny),
            (&nocert, fg_failover, Unauth),
            (&Caller::InsecureLocal, fg_failover, Allow),
            (&Caller::InsecureLocal, vc, Allow),
            (&Caller::InsecureLocal, raft(), Allow),
        ];
        for (caller, access, want) in cases {
            let got = match policy.decide(caller, &access, &rules) {
                Decision::Allow(_) => Allow,
                Decision::Denied(_) => Deny,
                Decision::Unauthenticated(_) => Unauth,
            };
            assert_eq!(got, want, "{caller} {access}");
        }
    }

    #[test]
    fn messages_name_identity_and_operation() {
        let policy = Policy::new(Some("example.org"), vec![]).unwrap();
        let edge = id("spiffe://example.org/edge/e1");
        let a = Access::resource(ctl(C::Apply), Kind::VirtualCluster, "vc1");
        assert_eq!(
            policy.decide(&edge, &a, &[]),
            Decision::Denied(
                "spiffe://example.org/edge/e1 may not Control/Apply VirtualCluster/vc1".into()
            )
        );
        let nocert = Caller::Anonymous {
            why: "no client certificate",
        };
        assert_eq!(
            policy.decide(&nocert, &Access::kind(ctl(C::List), Some(Kind::Edge)), &[]),
            Decision::Unauthenticated(
                "Control/List Edge needs a client certificate with a SPIFFE ID: no client certificate"
                    .into()
            )
        );
    }

    #[test]
    fn no_trust_domain_means_no_default_roles() {
        let policy = Policy::new(None, vec![]).unwrap();
        let edge = id("spiffe://example.org/edge/e1");
        let a = Access::kind(ctl(C::Watch), None);
        assert!(matches!(policy.decide(&edge, &a, &[]), Decision::Denied(_)));
        assert!(Policy::new(Some("a/b"), vec![]).is_err());
        assert!(Policy::new(Some(""), vec![]).is_err());
    }

    #[test]
    fn roles_add_up() {
        let policy = Policy::new(Some("d"), vec![]).unwrap();
        let rules = vec![AccessRuleSpec {
            identities: vec!["spiffe://d/edge/e1".into()],
            role: AccessRole::Reader,
        }];
        let sid = SpiffeId::parse("spiffe://d/edge/e1").unwrap();
        let g = policy.grants(&sid, &rules);
        assert!(g.reader);
        assert_eq!(g.edge.as_deref(), Some("e1"));
        assert_eq!(g.scoped_edge(), None);
    }
}
