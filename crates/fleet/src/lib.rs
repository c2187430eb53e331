//! Per-job EC2 runners on AWS: three Lambda functions (binaries `ec2-provision`,
//! `ec2-teardown`, `reaper`) that share their adapters, so they live in one crate. Every
//! decision is in `ephemeral_core::fleet` and `ephemeral_core::ec2`; this crate reads the
//! configuration, builds clients once, and carries out what the core decides.

pub mod aws;
pub mod config;
pub mod function;
pub mod gitlab;
pub mod handlers;
pub mod lease;
pub mod slots;

pub use config::{
    ConfigError, FleetConfig, FleetSetup, SHELL_RUNNER_MODE, SlotsConfig, shell_runner_mode,
    shell_runner_mode_from_env,
};
pub use handlers::{Functions, Invocation, ProvisionInput, ProvisionOutput, TeardownInput};

pub use ephemeral_aws::now_ms;
