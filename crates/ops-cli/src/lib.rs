//! `runner-ops`: what an operator needs to see and steer a deployed stack, the sibling of
//! `runner-mappings` with the same conventions (`--stack` resolves names through the stack's
//! outputs, an explicit flag overrides each, `--json` for scripts, aligned tables for people).
//!
//! - `status`: jobs by phase, jobs waiting for a runner slot, failed provisions with their
//!   recorded reason, given-up jobs, the runners and instances we own, the drain switch, the
//!   oldest pending job we hold;
//! - `job PROJECT JOB`: one job's history as recorded (item, executions, instances, runners);
//! - `retry PROJECT JOB`: one new provision attempt, the reconciler's way;
//! - `drain` / `undrain`: stop starting runners (running jobs finish, new ones wait), and go on;
//! - `dead-letters list|show|replay`: the stack's dead-letter queues, why each message was set
//!   aside, and replay through the normal path.
//!
//! Every decision is in `ephemeral_core::ops` (and the reconciler's core); this crate reads,
//! writes through the functions' own adapters where they exist, and prints.
//!
//! Exit codes: 0 success (also "nothing to do": a retry while the attempt is young, a drain
//! of a drained fleet); 1 an operational failure (an AWS call failed, a replay failed); 2 bad
//! input (arguments, a stack without the output a command needs, a job that cannot be
//! retried, a message that cannot be replayed); 3 not found (the stack, the job, a message).

pub mod cli;
pub mod drain;
pub mod job;
pub mod letters;
pub mod retry;
pub mod show;
pub mod stack;
pub mod status;

pub use cli::{Cli, Command, Failure, NOT_FOUND, OPERATIONAL, USAGE, run};
pub use mapping_cli::Outcome;
