// The mapper's nested futures exceed the default depth when the compiler lays out `main`'s.
#![recursion_limit = "256"]

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
    mapper::function::serve().await
}
