//! The function's main body, run by its binary and by the stack's combined `functions` binary
//! (`crates/functions`): configuration read and clients built once, then the Lambda runtime's
//! loop.

use crate::aws::{DynamoJobStore, StepFunctions};
use crate::{Router, RouterConfig};
use aws_lambda_events::eventbridge::EventBridgeEvent;
use lambda_runtime::{LambdaEvent, service_fn};
use serde_json::Value;

use ephemeral_aws::now_ms;

/// The router: EventBridge "GitLab Job Event"s in, the jobs table and the workflows.
pub async fn serve() -> Result<(), lambda_runtime::Error> {
    ephemeral_aws::init_logging();
    let config = RouterConfig::from_env()?;
    let sdk = aws_config::load_from_env().await;
    let router = Router {
        store: DynamoJobStore {
            client: aws_sdk_dynamodb::Client::new(&sdk),
            table: config.jobs_table_name,
            ttl_seconds: config.job_ttl_seconds,
        },
        workflows: StepFunctions {
            client: aws_sdk_sfn::Client::new(&sdk),
            provision_arn: config.provision_state_machine_arn,
            teardown_arn: config.teardown_state_machine_arn,
        },
        provision_on: config.provision_on,
    };
    let router = &router;
    lambda_runtime::run(service_fn(
        move |event: LambdaEvent<EventBridgeEvent<Value>>| async move {
            router
                .handle(&event.payload, now_ms())
                .await
                .map(|outcome| format!("{outcome:?}"))
                // An error makes Lambda retry the event, then file it in the on-failure queue.
                .map_err(lambda_runtime::Error::from)
        },
    ))
    .await
}
