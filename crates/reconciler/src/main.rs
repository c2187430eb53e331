//! The reconciler, on a schedule: provisions every job GitLab has pending for us that no
//! runner of ours can take. The scheduled event's content is not used.
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
    reconciler::function::serve().await
}
