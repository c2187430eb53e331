//! The intake drainer as Lambda runs it: the fallback queue's SQS event source in, batch item
//! failures out (the event source mapping has `ReportBatchItemFailures`).

use aws_lambda_events::sqs::SqsEvent;
use lambda_runtime::{LambdaEvent, service_fn};
use webhook::config::DrainerConfig;
use webhook::drainer::AwsDrainer;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
    ephemeral_aws::init_logging();
    let config = DrainerConfig::from_env()?;
    let sdk = aws_config::load_from_env().await;
    let drainer = AwsDrainer::from_config(config, &sdk);
    let drainer = &drainer;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<SqsEvent>| async move {
        Ok::<_, std::convert::Infallible>(drainer.handle(event.payload).await)
    }))
    .await
}
