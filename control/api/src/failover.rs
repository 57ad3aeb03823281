//! `Control/Failover`: an admin switches a FailoverGroup's active cluster.
//! The node stamps the decision with the caller's identity and its clock
//! before proposing it, so the state machine that applies it on every
//! replica stays deterministic; compare-and-set on the generation happens
//! there, in the one place that sees every decision in order.

use std::time::{SystemTime, UNIX_EPOCH};

use strait_control_state::spec::FenceAction;
use strait_control_state::{Command, Kind, Outcome};
use strait_proto::control as pb;
use tonic::{Request, Response, Status};

use crate::access::{Access, ControlMethod, Operation};
use crate::{status_of, to_pb, ControlService};

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl ControlService {
    pub(crate) async fn failover_group(
        &self,
        req: Request<pb::FailoverRequest>,
    ) -> Result<Response<pb::Resource>, Status> {
        let caller = self.authz.caller(&req);
        let req = req.into_inner();
        let group = req.group.clone();
        let access = Access::resource(
            Operation::Control(ControlMethod::Failover),
            Kind::FailoverGroup,
            &group,
        );
        self.authz.check(&caller, access)?;
        let cmd = Command::Failover {
            group: req.group,
            to: req.to,
            expected_generation: req.expected_generation,
            planned: req.planned,
            failback: req.failback,
            reason: req.reason,
            by: caller.to_string(),
            at_unix_ms: now_unix_ms(),
            fence: match pb::FenceAction::try_from(req.fence) {
                Ok(pb::FenceAction::Switch) => FenceAction::Switch,
                Ok(pb::FenceAction::Raise) => FenceAction::Raise,
                Ok(pb::FenceAction::Lift) => FenceAction::Lift,
                Err(_) => {
                    return Err(Status::invalid_argument(format!(
                        "unknown fence action {}",
                        req.fence
                    )))
                }
            },
        };
        let result = match self.node.propose(&cmd).await.map_err(status_of) {
            Ok(Outcome::StatusUpdated { resource }) => {
                tracing::info!(
                    group = %group,
                    active = %resource.status["active"],
                    generation = %resource.status["generation"],
                    by = %caller,
                    "failover decided"
                );
                Ok(Response::new(to_pb(&resource)))
            }
            Ok(other) => Err(Status::internal(format!("unexpected outcome {other:?}"))),
            Err(s) => Err(s),
        };
        self.authz.audit_write(&caller, &access, &result);
        result
    }
}
