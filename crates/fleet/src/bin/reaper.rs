//! The reaper, on a schedule: removes instances, runners and token parameters that outlived
//! their job. The scheduled event's content is not used. One pass at a time: each pass holds
//! the `reaper` lease in the leases table for its invocation (request id, until its deadline).
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
    fleet::function::reaper().await
}
