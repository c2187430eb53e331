//! Provision step of the provision workflow: one GitLab runner on one EC2 instance for one
//! job (EC2 branch), or one GitLab runner for a LAMBDA job's shell-runner invocation.
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
    fleet::function::provision().await
}
