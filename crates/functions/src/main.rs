// The functions' nested futures exceed the default depth when the compiler lays out `main`'s.
#![recursion_limit = "256"]

use lambda_functions::{Function, HANDLER};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
    let handler = std::env::var(HANDLER).ok();
    let function = Function::of_handler(handler.as_deref())?;
    function.serve().await
}
