//! Teardown step of the teardown workflow: removes the runner that ran a finished job (and the
//! job's own runner when it never got a job).
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
    fleet::function::teardown().await
}
