//! The template's functions against the combined binary: every function built from
//! `lambda-functions` names, in its `Handler`, a function the binary serves, and each of those
//! is deployed exactly once. A Handler renamed on one side only would be a function that fails
//! its first cold start in AWS (`_HANDLER=... not a function of this binary`).

use std::collections::BTreeMap;
use std::path::Path;

use lambda_functions::Function;
use serde_norway::Value;

const BINARY: &str = "lambda-functions";

fn template() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../template.yaml");
    serde_norway::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Each function built from the combined binary: (resource name, Handler).
fn combined(template: &Value) -> Vec<(String, String)> {
    let resources = template["Resources"].as_mapping().unwrap();
    resources
        .iter()
        .filter(|(_, r)| r["Type"].as_str() == Some("AWS::Serverless::Function"))
        .filter(|(_, r)| r["Metadata"]["BuildProperties"]["Binary"].as_str() == Some(BINARY))
        .map(|(name, r)| {
            let handler = r["Properties"]["Handler"].as_str().unwrap_or_default();
            (name.as_str().unwrap().to_owned(), handler.to_owned())
        })
        .collect()
}

/// What is wrong between the template's combined functions and the binary's.
fn problems(functions: &[(String, String)]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut deployed: BTreeMap<Function, Vec<&str>> = BTreeMap::new();
    for (resource, handler) in functions {
        match Function::of_handler(Some(handler)) {
            Ok(f) => deployed.entry(f).or_default().push(resource),
            Err(e) => problems.push(format!("{resource}: {e}")),
        }
    }
    for function in Function::ALL {
        match deployed.get(&function).map(Vec::as_slice) {
            Some([_]) => {}
            None => problems.push(format!(
                "{}: no function of template.yaml runs it",
                function.name()
            )),
            Some(many) => problems.push(format!("{}: run by {many:?}", function.name())),
        }
    }
    problems
}

#[test]
fn every_handler_is_a_function_of_the_binary_and_each_is_deployed_once() {
    let functions = combined(&template());
    assert_eq!(functions.len(), Function::ALL.len(), "{functions:?}");
    assert_eq!(problems(&functions), Vec::<String>::new());
}

#[test]
fn a_handler_renamed_in_the_template_only_is_caught() {
    let mut functions = combined(&template());
    let router = functions.iter_mut().find(|(_, h)| h == "router").unwrap();
    router.1 = "route".into();
    let found = problems(&functions);
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(
        found[0].starts_with("RouterFunction: _HANDLER=`route`"),
        "{found:?}"
    );
    assert_eq!(found[1], "router: no function of template.yaml runs it");
}
