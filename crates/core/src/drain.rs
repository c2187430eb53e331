//! Draining the fleet: no new runner starts (an EC2 instance, or the GitLab runner of a LAMBDA
//! job's shell-runner invocation), running jobs finish, and new jobs wait, e.g. before an AMI
//! change. Set and cleared by an operator (`runner-ops drain` / `undrain`).
//!
//! Nothing is lost: a drained provision does what a full instance cap does. It launches
//! nothing, notes on the job's item that it waits ([`crate::jobs_table::attr::
//! WAITING_FOR_SLOT_SINCE_MS`], with the cap [`DRAINED`]) and answers
//! [`crate::fleet::Provisioned::WaitingForSlot`] (or [`crate::lambda_runner::RunnerGrant::
//! WaitingForSlot`]): the workflow succeeds, nothing is recorded as failed or skipped. The
//! reconciler counts no free slot while drained ([`crate::slots::FreeSlots::none`]), so it
//! starts no waiting job; after `undrain` its next pass starts them, oldest first, within the
//! caps if there are any. This works without caps too: the switch is not in the slots table
//! (which a stack without `MaxRunnerInstances` does not use) but in the jobs table, which
//! every stack has, as one control item ([`crate::jobs_table::DRAIN_KEY`]) whose key is no
//! job's key, so every reader of job items passes it by.
//!
//! A provision that read the switch just before `drain` was written may still start one
//! runner: drain stops new starts from the moment it is written, not the ones already past
//! the check.

use serde::Serialize;

/// The cap a drained job waits for, as recorded on its item (`waiting_for_slot_cap`) and in
/// [`crate::slots::CapReached::counter`].
pub const DRAINED: &str = "drained";

/// The switch as the control item holds it: set since `since_ms`, by whom and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Drain {
    pub since_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}
