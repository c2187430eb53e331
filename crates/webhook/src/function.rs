//! The two functions' main bodies, run each by its binary and by the stack's combined `functions` binary
//! (`crates/functions`): configuration read and clients built once, then the Lambda runtime's
//! loop.

use crate::AwsWebhook;
use crate::config::DrainerConfig;
use crate::config::WebhookConfig;
use crate::drainer::AwsDrainer;
use aws_lambda_events::apigw::ApiGatewayV2httpRequest;
use aws_lambda_events::sqs::SqsEvent;
use lambda_runtime::{LambdaEvent, service_fn};

/// The webhook: API Gateway requests in, replies out, `JobEvent`s on the bus.
pub async fn webhook() -> Result<(), lambda_runtime::Error> {
    ephemeral_aws::init_logging();
    let config = WebhookConfig::from_env()?;
    let sdk = aws_config::load_from_env().await;
    let webhook = AwsWebhook::from_config(config, &sdk);
    let webhook = &webhook;
    lambda_runtime::run(service_fn(
        move |event: LambdaEvent<ApiGatewayV2httpRequest>| async move {
            Ok::<_, std::convert::Infallible>(webhook.handle(event.payload).await)
        },
    ))
    .await
}

/// The intake drainer as Lambda runs it: the fallback queue's SQS event source in, batch item
/// failures out (the event source mapping has `ReportBatchItemFailures`).
pub async fn intake_drainer() -> Result<(), lambda_runtime::Error> {
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
