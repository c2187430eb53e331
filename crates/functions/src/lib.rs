//! Which function a process of the combined binary is: Lambda sets `_HANDLER` to the
//! function's `Handler` in `template.yaml`. One binary serves them all so that `sam build`
//! compiles and links the AWS SDK once, not once per function (the build numbers in docs/benchmarks.md).

use serde::{Deserialize, Serialize};

/// The variable Lambda sets to the function's `Handler` (custom runtimes read it themselves).
pub const HANDLER: &str = "_HANDLER";

/// Each function of the binary, by the `Handler` the template gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Function {
    Webhook,
    IntakeDrainer,
    Router,
    Mapper,
    #[serde(rename = "ec2-provision")]
    Ec2Provision,
    #[serde(rename = "ec2-teardown")]
    Ec2Teardown,
    Reaper,
    Reconciler,
}

impl Function {
    pub const ALL: [Self; 8] = [
        Self::Webhook,
        Self::IntakeDrainer,
        Self::Router,
        Self::Mapper,
        Self::Ec2Provision,
        Self::Ec2Teardown,
        Self::Reaper,
        Self::Reconciler,
    ];

    /// The function `handler` names; the error lists every name the binary serves.
    pub fn of_handler(handler: Option<&str>) -> Result<Self, String> {
        let handler = handler.unwrap_or_default().trim();
        ephemeral_core::text::from_text(handler).map_err(|e| {
            format!("{HANDLER}=`{handler}`: not a function of this binary ({e}); set the function's Handler in template.yaml")
        })
    }

    pub fn name(self) -> String {
        ephemeral_core::text::to_text(&self)
    }

    /// Runs the function: its configuration, its clients, then the Lambda runtime's loop.
    pub async fn serve(self) -> Result<(), lambda_runtime::Error> {
        match self {
            Self::Webhook => webhook::function::webhook().await,
            Self::IntakeDrainer => webhook::function::intake_drainer().await,
            Self::Router => router::function::serve().await,
            Self::Mapper => mapper::function::serve().await,
            Self::Ec2Provision => fleet::function::provision().await,
            Self::Ec2Teardown => fleet::function::teardown().await,
            Self::Reaper => fleet::function::reaper().await,
            Self::Reconciler => reconciler::function::serve().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_handler_names_one_function_and_a_wrong_one_lists_them() {
        for function in Function::ALL {
            assert_eq!(Function::of_handler(Some(&function.name())), Ok(function));
        }
        let wrong = Function::of_handler(Some("bootstrap")).unwrap_err();
        assert!(
            wrong.starts_with("_HANDLER=`bootstrap`: not a function"),
            "{wrong}"
        );
        assert!(
            wrong.contains("ec2-provision") && wrong.contains("intake-drainer"),
            "{wrong}"
        );
        assert!(Function::of_handler(None).is_err());
    }
}
