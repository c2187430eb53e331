//! Every decision of the ephemeral-runners product, with no AWS SDK: authentication of GitLab
//! hooks, parsing and slimming them, and (in later modules) routing, job state and plans.
//! Function crates translate Lambda events into these types and carry out what they decide.

pub mod auth;
pub mod cache;
pub mod drain;
pub mod ec2;
pub mod env;
pub mod fleet;
pub mod hook;
pub mod jobs;
pub mod jobs_table;
pub mod lambda_runner;
pub mod lease;
pub mod mapping;
pub mod metrics;
pub mod ops;
pub mod pool;
pub mod reconcile;
pub mod secret_scope;
pub mod secrets;
pub mod shell;
pub mod slots;
pub mod task_error;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod text;
pub mod webhook;

pub use hook::{JobEvent, JobStatus, RunnerRef};
