//! `runner-mappings`: manage the mapping table (which executor runs which GitLab job) from a
//! registry file, the seed's `job_runner_registry.json` shape, in JSON or YAML.
//!
//! The logic lives here so that tests can run every command in-process against any
//! `SdkConfig`; `main` only parses arguments, loads the AWS configuration and prints.
//!
//! Exit codes: 0 success (and, for `diff`, no difference); 1 an error (invalid file or item,
//! AWS failure, bad arguments); 2 `diff` found differences, or `delete` found no such item.

pub mod cli;
pub mod plan;
pub mod registry;
pub mod table;

pub use cli::{Cli, Command, Outcome, run};
