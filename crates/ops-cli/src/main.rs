use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser as _;
use ops_cli::{Cli, USAGE};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print to stdout and succeed; usage errors exit 2.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { USAGE } else { 0 });
        }
    };
    // Region and credentials come from the usual places (AWS_REGION, AWS_PROFILE, ...), and
    // AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_<SERVICE>) is honoured.
    let sdk = aws_config::load_from_env().await;
    let outcome = ops_cli::run(cli, &sdk).await;
    let _ = std::io::stdout().write_all(outcome.stdout.as_bytes());
    let _ = std::io::stderr().write_all(outcome.stderr.as_bytes());
    ExitCode::from(outcome.code)
}
