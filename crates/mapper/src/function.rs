//! The function's main body, run by its binary and by the stack's combined `functions` binary
//! (`crates/functions`): configuration read and clients built once, then the Lambda runtime's
//! loop.

// reqwest's nested futures inside the Lambda runtime's service exceed the default depth
// when the compiler lays out `main`'s future.

use crate::{DynamoMappingRules, GitLabJobs, Mapper, MapperConfig, TokenSource, diagnostic};
use ephemeral_core::jobs::WorkflowInput;
use lambda_runtime::{LambdaEvent, service_fn};

/// The mapper: the provision workflow's first state.
pub async fn serve() -> Result<(), lambda_runtime::Error> {
    ephemeral_aws::init_logging();
    let config = MapperConfig::from_env()?;
    let sdk = aws_config::load_from_env().await;
    let token = config
        .gitlab_api_token_parameter
        .map(|p| TokenSource::new(aws_sdk_ssm::Client::new(&sdk), p));
    let mapper = Mapper {
        rules: DynamoMappingRules {
            client: aws_sdk_dynamodb::Client::new(&sdk),
            table: config.mapping_table_name,
        },
        gitlab: GitLabJobs::new(config.gitlab_url, token),
        default_route: config.default_route,
    };
    let mapper = &mapper;
    lambda_runtime::run(service_fn(
        move |event: LambdaEvent<WorkflowInput>| async move {
            // The error goes to Step Functions, whose Retry/Catch act on its errorType.
            mapper
                .handle(&event.payload)
                .await
                .map_err(|e| diagnostic(&e))
        },
    ))
    .await
}
