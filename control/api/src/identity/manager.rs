//! Work the leader does for the CA beside the state machine: create the
//! first generation, rotate (prepare, activate, retire), publish the trust
//! bundle as a TrustBundle resource, and prune expired issuance records
//! and join tokens. Followers do nothing here; every step is a
//! compare-and-set write, so a leader change in the middle is harmless.

use std::time::Duration;

use strait_control_ca::issued::{expired, last_not_after};
use strait_control_ca::{generate_root, plan, CaState, SealContext, Transition};
use strait_control_state::spec::{CertificateAuthoritySpec, TrustBundleSpec};
use strait_control_state::{typed, validate_name, Kind};
use tonic::Status;

use super::store::{self, ca_name, from_ca_state};
use super::{now_unix, IdentityService};

/// Runs the leader's CA duties every `period`.
pub fn spawn_manager(svc: IdentityService, period: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let node = svc.node();
            if node.status().leader_id != node.id() {
                continue;
            }
            if let Err(e) = run_once(&svc, now_unix()).await {
                tracing::warn!(error = %e.message(), "CA housekeeping failed; retrying");
            }
        }
    })
}

async fn run_once(svc: &IdentityService, now: i64) -> Result<(), Status> {
    let cfg = svc.config();
    let node = svc.node();
    let stored = store::cas(node, &cfg.trust_domain);
    let gens: Vec<_> = stored.iter().map(|c| c.generation()).collect();
    let issued = svc.issued();
    let transitions = plan(
        &gens,
        now,
        &cfg.rotation,
        |g| last_not_after(&issued, g),
        false,
    );
    for t in transitions {
        match t {
            Transition::Generate {
                generation,
                activate_at_unix,
            } => generate(svc, generation, activate_at_unix, now).await?,
            Transition::Activate { generation } => {
                set_state(svc, generation, CaState::Active, None).await?
            }
            Transition::Retire {
                generation,
                retire_after_unix,
            } => set_state(svc, generation, CaState::Retiring, Some(retire_after_unix)).await?,
            Transition::Retired { generation } => {
                set_state(svc, generation, CaState::Retired, None).await?
            }
        }
    }
    publish_bundle(svc, now).await?;
    for r in expired(&issued, now) {
        store::delete(node, Kind::IssuedCertificate, &r.serial_hex).await?;
    }
    for name in store::expired_tokens(node, now) {
        store::delete(node, Kind::JoinToken, &name).await?;
    }
    Ok(())
}

/// Creates generation `generation` (sealed), Active at once or Prepared
/// until `activate_at_unix`; compare-and-set on its absence.
pub(super) async fn generate(
    svc: &IdentityService,
    generation: u64,
    activate_at_unix: Option<i64>,
    now: i64,
) -> Result<(), Status> {
    let cfg = svc.config();
    let td = cfg.trust_domain.clone();
    let root = generate_root(&td, generation, now, cfg.rotation.validity)
        .map_err(|e| Status::internal(e.to_string()))?;
    let ctx = SealContext {
        trust_domain: td.clone(),
        generation,
    };
    let sealed = cfg
        .sealer
        .seal(&root.key_der, &ctx)
        .await
        .map_err(|e| Status::unavailable(format!("sealing the CA key: {e}")))?;
    let spec = CertificateAuthoritySpec {
        trust_domain: td.clone(),
        generation,
        cert_pem: root.cert_pem,
        sealed_key: sealed,
        sealer: cfg.sealer.name(),
        state: if activate_at_unix.is_some() {
            from_ca_state(CaState::Prepared)
        } else {
            from_ca_state(CaState::Active)
        },
        not_after_unix: root.not_after_unix,
        activate_at_unix,
        retire_after_unix: None,
    };
    store::put(
        svc.node(),
        Kind::CertificateAuthority,
        &ca_name(generation),
        serde_json::to_value(spec).expect("spec serializes"),
        Some(0),
    )
    .await?;
    tracing::info!(
        target: super::AUDIT,
        trust_domain = %td,
        generation,
        activate_at_unix,
        "CA generation created"
    );
    Ok(())
}

/// An operator's rotation: the transitions of a forced plan, which is at
/// most one Generate (refused while a generation is already prepared).
pub(super) async fn rotate_now(svc: &IdentityService, now: i64) -> Result<(u64, i64), Status> {
    let cfg = svc.config();
    let gens: Vec<_> = store::cas(svc.node(), &cfg.trust_domain)
        .iter()
        .map(|c| c.generation())
        .collect();
    if strait_control_ca::signer(&gens, now).is_none() {
        return Err(Status::failed_precondition(
            "the CA has no active generation yet; nothing to rotate",
        ));
    }
    let issued = svc.issued();
    let next = plan(
        &gens,
        now,
        &cfg.rotation,
        |g| last_not_after(&issued, g),
        true,
    )
    .into_iter()
    .find_map(|t| match t {
        Transition::Generate {
            generation,
            activate_at_unix: Some(at),
        } => Some((generation, at)),
        _ => None,
    });
    let Some((generation, at)) = next else {
        return Err(Status::failed_precondition(
            "a prepared CA generation is already waiting to sign; rotate again after it activates",
        ));
    };
    generate(svc, generation, Some(at), now).await?;
    Ok((generation, at))
}

async fn set_state(
    svc: &IdentityService,
    generation: u64,
    state: CaState,
    retire_after: Option<i64>,
) -> Result<(), Status> {
    let node = svc.node();
    let Some(cur) = store::cas(node, &svc.config().trust_domain)
        .into_iter()
        .find(|c| c.spec.generation == generation)
    else {
        return Ok(());
    };
    let mut spec = cur.spec.clone();
    spec.state = from_ca_state(state);
    if retire_after.is_some() {
        spec.retire_after_unix = retire_after;
    }
    store::put(
        node,
        Kind::CertificateAuthority,
        &ca_name(generation),
        serde_json::to_value(spec).expect("spec serializes"),
        Some(cur.revision),
    )
    .await?;
    tracing::info!(
        target: super::AUDIT,
        generation,
        state = state.as_str(),
        "CA generation changed state"
    );
    Ok(())
}

/// Keeps the TrustBundle resource named after the trust domain equal to
/// the current bundle, so edges receive new roots through their watch.
async fn publish_bundle(svc: &IdentityService, now: i64) -> Result<(), Status> {
    let td = &svc.config().trust_domain;
    if validate_name(td).is_err() {
        return Ok(());
    }
    let pem = svc.bundle_pem(now);
    if pem.is_empty() {
        return Ok(());
    }
    let node = svc.node();
    let current = {
        let state = node.state();
        state
            .get(Kind::TrustBundle, td)
            .and_then(|r| typed::<TrustBundleSpec>(&r.spec).ok())
    };
    if current.is_some_and(|c| c.pem == pem && c.trust_domain == *td) {
        return Ok(());
    }
    let spec = TrustBundleSpec {
        trust_domain: td.clone(),
        pem,
    };
    store::put(
        node,
        Kind::TrustBundle,
        td,
        serde_json::to_value(spec).expect("spec serializes"),
        None,
    )
    .await?;
    Ok(())
}
