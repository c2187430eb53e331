//! Arguments and the commands behind them. Each command writes its human (or `--json`)
//! output into an [`Outcome`]; `main` prints it and exits with its code.

use std::fmt::Write as _;

use aws_config::SdkConfig;
use clap::{Args, Parser, Subcommand, ValueEnum};
use ephemeral_core::jobs::JobKey;
use ephemeral_core::ops::LetterQueue;

use crate::Outcome;
use crate::stack::{Overrides, Resolver};

/// An AWS call failed, or a replay did.
pub const OPERATIONAL: u8 = 1;
/// Bad arguments, a stack without the output the command needs, a job that cannot be
/// retried, a message that cannot be replayed.
pub const USAGE: u8 = 2;
/// No such stack, job or message.
pub const NOT_FOUND: u8 = 3;

/// See and steer a deployed ephemeral-runners stack: status, one job's history, retry,
/// drain, and the dead-letter queues.
///
/// Names come from the stack's outputs (--stack); a flag such as --jobs-table overrides one.
///
/// Exit codes: 0 success (also when there was nothing to do); 1 an AWS call or a replay
/// failed; 2 bad input (arguments, a stack without the output a command needs, a job that
/// cannot be retried, a message that cannot be replayed); 3 no such stack, job or message.
#[derive(Debug, Parser)]
#[command(name = "runner-ops", version)]
pub struct Cli {
    #[command(flatten)]
    pub target: Target,
    /// Machine-readable output (JSON)
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// Where the stack's resources are: the stack, and overrides of its outputs.
#[derive(Debug, Clone, Default, Args)]
pub struct Target {
    /// A deployed stack: names come from its outputs (JobsTableName, ...)
    #[arg(long, value_name = "STACK", global = true)]
    pub stack: Option<String>,
    /// The jobs table (output JobsTableName)
    #[arg(long, value_name = "NAME", global = true)]
    pub jobs_table: Option<String>,
    /// The runner registry table (output RunnersTableName)
    #[arg(long, value_name = "NAME", global = true)]
    pub runners_table: Option<String>,
    /// The provision workflow (output ProvisionStateMachineArn)
    #[arg(long, value_name = "ARN", global = true)]
    pub provision_state_machine: Option<String>,
    /// The teardown workflow (output TeardownStateMachineArn)
    #[arg(long, value_name = "ARN", global = true)]
    pub teardown_state_machine: Option<String>,
    /// The router's dead-letter queue (output RouterDeadLetterQueueUrl)
    #[arg(long, value_name = "URL", global = true)]
    pub router_dlq: Option<String>,
    /// The intake drainer's dead-letter queue (output IntakeFallbackDeadLetterQueueUrl)
    #[arg(long, value_name = "URL", global = true)]
    pub intake_dlq: Option<String>,
    /// The webhook's dead letters (output DeadLetterQueueUrl)
    #[arg(long, value_name = "URL", global = true)]
    pub webhook_dlq: Option<String>,
    /// The intake fallback queue the drainer reads (output IntakeFallbackQueueUrl)
    #[arg(long, value_name = "URL", global = true)]
    pub intake_queue: Option<String>,
    /// The router function (output RouterFunctionName)
    #[arg(long, value_name = "NAME", global = true)]
    pub router_function: Option<String>,
    /// The runner slots table (output SlotsTableName)
    #[arg(long, value_name = "NAME", global = true)]
    pub slots_table: Option<String>,
    /// The stack's instance cap, 0 for none (output InstanceCap)
    #[arg(long, value_name = "N", global = true)]
    pub instance_cap: Option<String>,
    /// The per-project instance cap, 0 for none (output InstanceCapPerProject)
    #[arg(long, value_name = "N", global = true)]
    pub instance_cap_per_project: Option<String>,
    /// The stack name the instances are tagged with (ephemeral-runners:managed-by); default:
    /// --stack
    #[arg(long, value_name = "STACK", global = true)]
    pub managed_by: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Jobs by phase, waiting and failed jobs, runners and instances, the drain switch
    Status,
    /// One job's history as recorded: its item, executions, instances and runners
    Job {
        #[command(flatten)]
        job: JobArgs,
    },
    /// Start one new provision attempt of a job, the way the reconciler does
    Retry {
        #[command(flatten)]
        job: JobArgs,
        /// Start one even while the current attempt is young or its workflow runs
        #[arg(long)]
        force: bool,
        /// How long an attempt that has not failed counts as young
        #[arg(long, value_name = "SECONDS", default_value_t = ephemeral_core::ops::RETRY_YOUNG_MS / 1000)]
        young: u64,
    },
    /// Stop starting runners: running jobs finish, new jobs wait until undrain
    Drain {
        /// Why, shown by status
        #[arg(long)]
        reason: Option<String>,
        /// Who, shown by status (default: $USER)
        #[arg(long)]
        by: Option<String>,
    },
    /// Start runners again: the reconciler starts the waiting jobs, oldest first
    Undrain,
    /// The dead-letter queues: list, show, replay
    #[command(subcommand)]
    DeadLetters(Letters),
}

#[derive(Debug, Subcommand)]
pub enum Letters {
    /// Every message, with why it was set aside
    List {
        /// Only these queues (default: all three)
        #[arg(long, value_enum)]
        queue: Vec<QueueArg>,
    },
    /// One message: why, its attributes, its body
    Show {
        /// The message id (as list shows it)
        id: String,
    },
    /// Send messages back through the normal path, then delete them from their queue
    Replay {
        /// Message ids (as list shows them)
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QueueArg {
    Router,
    Intake,
    Webhook,
}

impl From<QueueArg> for LetterQueue {
    fn from(q: QueueArg) -> Self {
        match q {
            QueueArg::Router => Self::Router,
            QueueArg::Intake => Self::Intake,
            QueueArg::Webhook => Self::Webhook,
        }
    }
}

#[derive(Debug, Clone, Copy, Args)]
pub struct JobArgs {
    /// GitLab's numeric project id
    #[arg(value_name = "PROJECT")]
    pub project_id: u64,
    /// GitLab's numeric job id
    #[arg(value_name = "JOB")]
    pub job_id: u64,
}

impl JobArgs {
    pub fn key(&self) -> JobKey {
        JobKey {
            project_id: self.project_id,
            job_id: self.job_id,
        }
    }
}

/// Why a command did not succeed: the message and the exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn usage(message: impl Into<String>) -> Self {
        Self {
            code: USAGE,
            message: message.into(),
        }
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            code: NOT_FOUND,
            message: message.into(),
        }
    }
    pub fn aws(message: impl Into<String>) -> Self {
        Self {
            code: OPERATIONAL,
            message: message.into(),
        }
    }
}

/// What a command has at hand.
pub struct Context<'a> {
    pub sdk: &'a SdkConfig,
    pub stack: Resolver,
    pub json: bool,
    pub now_ms: u64,
}

pub use ephemeral_aws::now_ms;

/// Runs one command.
pub async fn run(cli: Cli, sdk: &SdkConfig) -> Outcome {
    let mut out = Outcome::default();
    let result = match sdk.region() {
        None => Err(Failure::usage(
            "no AWS region configured: set AWS_REGION (or AWS_PROFILE with a region)",
        )),
        Some(_) => {
            let ctx = Context {
                sdk,
                stack: Resolver::new(sdk, Overrides::from(&cli.target)),
                json: cli.json,
                now_ms: now_ms(),
            };
            match cli.command {
                Command::Status => crate::status::status(&mut out, &ctx).await,
                Command::Job { job } => crate::job::job(&mut out, &ctx, job.key()).await,
                Command::Retry { job, force, young } => {
                    crate::retry::retry(&mut out, &ctx, job.key(), force, young * 1000).await
                }
                Command::Drain { reason, by } => {
                    let by = by.or_else(|| std::env::var("USER").ok().filter(|u| !u.is_empty()));
                    crate::drain::drain(&mut out, &ctx, by, reason).await
                }
                Command::Undrain => crate::drain::undrain(&mut out, &ctx).await,
                Command::DeadLetters(Letters::List { queue }) => {
                    let queues: Vec<LetterQueue> = if queue.is_empty() {
                        LetterQueue::ALL.to_vec()
                    } else {
                        queue.into_iter().map(LetterQueue::from).collect()
                    };
                    crate::letters::list(&mut out, &ctx, &queues).await
                }
                Command::DeadLetters(Letters::Show { id }) => {
                    crate::letters::show(&mut out, &ctx, &id).await
                }
                Command::DeadLetters(Letters::Replay { ids }) => {
                    crate::letters::replay(&mut out, &ctx, &ids).await
                }
            }
        }
    };
    match result {
        Ok(code) => out.code = code,
        Err(failure) => {
            let _ = writeln!(out.stderr, "error: {}", failure.message);
            out.code = failure.code;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn arguments_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn ids_must_be_numbers_and_flags_go_anywhere() {
        let err = Cli::try_parse_from(["runner-ops", "job", "group/app", "12"]).unwrap_err();
        assert!(err.use_stderr());
        assert!(err.to_string().contains("PROJECT"), "{err}");
        let cli = Cli::try_parse_from([
            "runner-ops",
            "--stack",
            "s",
            "retry",
            "7",
            "12",
            "--force",
            "--json",
        ])
        .unwrap();
        assert_eq!(cli.target.stack.as_deref(), Some("s"));
        assert!(cli.json);
        assert!(matches!(cli.command, Command::Retry { force: true, .. }));
        assert!(Cli::try_parse_from(["runner-ops", "dead-letters", "replay"]).is_err());
    }
}
