use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser as _;
use mapping_cli::Cli;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print to stdout and succeed; usage errors exit 1, so that
            // 2 keeps meaning "differences" (diff) or "no such item" (delete).
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 1 } else { 0 });
        }
    };
    // Region and credentials come from the usual places (AWS_REGION, AWS_PROFILE, ...), and
    // AWS_ENDPOINT_URL is honoured. `validate` needs none of it.
    let sdk = if cli.command.needs_aws() {
        Some(aws_config::load_from_env().await)
    } else {
        None
    };
    let outcome = mapping_cli::run(cli, sdk.as_ref(), &mut std::io::stdin().lock()).await;
    let _ = std::io::stdout().write_all(outcome.stdout.as_bytes());
    let _ = std::io::stderr().write_all(outcome.stderr.as_bytes());
    ExitCode::from(outcome.code)
}
