//! The intake drainer as Lambda runs it: the fallback queue's SQS event source in, batch item
//! failures out (the event source mapping has `ReportBatchItemFailures`).
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
    webhook::function::intake_drainer().await
}
