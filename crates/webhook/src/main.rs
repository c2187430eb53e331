use lambda_runtime::{LambdaEvent, service_fn};
use webhook::AwsWebhook;
use webhook::config::WebhookConfig;

use aws_lambda_events::apigw::ApiGatewayV2httpRequest;

/// Logs as JSON lines on stdout, at the level Lambda's advanced logging controls ask for
/// (`AWS_LAMBDA_LOG_LEVEL`), else `RUST_LOG`, else INFO.
fn init_logging() {
    let level = std::env::var("AWS_LAMBDA_LOG_LEVEL")
        .or_else(|_| std::env::var("RUST_LOG"))
        .ok()
        .and_then(|l| l.parse::<tracing::Level>().ok())
        .unwrap_or(tracing::Level::INFO);
    tracing_subscriber::fmt()
        .json()
        .with_max_level(level)
        .with_target(false)
        .with_current_span(false)
        .flatten_event(true)
        .without_time()
        .init();
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
    init_logging();
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
