use lambda_runtime::{LambdaEvent, service_fn};
use webhook::AwsWebhook;
use webhook::config::WebhookConfig;

use aws_lambda_events::apigw::ApiGatewayV2httpRequest;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
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
