//! Which projects a webhook secret may speak for (issue 12, finding 3).
//!
//! Each GitLab project hook has its own secret, known to that project's maintainers, so a
//! valid secret proves "some project we serve", not "this project". A secret can therefore be
//! bound to project ids and/or namespace paths; a hook for a project outside the binding of
//! every secret that admitted it is refused (401). Unbound secrets admit any project, as
//! before.
//!
//! The parameter formats stay what they were (one token per line; whitespace-separated
//! `whsec_` keys). A parameter whose text starts with `[{` is a JSON list instead:
//!
//! ```json
//! [{"token": "s3cret-of-web", "projects": [12, 34], "namespaces": ["acme/web"]},
//!  {"token": "s3cret-of-ops"}]
//! ```
//!
//! (`"key": "whsec_..."` in the signing-token parameter). An entry without `projects` and
//! `namespaces` is unbound.
//!
//! Project ids are exact: every later step reads the job from GitLab by the hook's project id.
//! A namespace binding matches the hook's `path_with_namespace`, which is the hook's own
//! claim; bind by project id where the boundary must hold against a sender who lies about the
//! path.

use std::collections::BTreeSet;

use serde::Deserialize;

/// The projects one secret admits hooks for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SecretScope {
    pub projects: BTreeSet<u64>,
    /// Lowercased namespace paths, without leading or trailing `/`.
    pub namespaces: Vec<String>,
}

impl SecretScope {
    /// Whether a hook for this project is within the scope: its id is listed, or its path is
    /// a listed namespace or lies below one (`acme/web` admits `acme/web/app`, not
    /// `acme/webshop`).
    pub fn admits(&self, project_id: u64, project_path: Option<&str>) -> bool {
        if self.projects.contains(&project_id) {
            return true;
        }
        let Some(path) = project_path.map(|p| p.trim_matches('/').to_lowercase()) else {
            return false;
        };
        self.namespaces.iter().any(|ns| {
            path.strip_prefix(ns.as_str())
                .is_some_and(|rest| rest.starts_with('/'))
        })
    }
}

/// What the secrets that admitted a request allow it to speak for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admits {
    /// An unbound secret matched: any project.
    Any,
    /// Only bound secrets matched: a project within any of their scopes.
    Scopes(Vec<SecretScope>),
    /// Both methods were required (`AuthMode::Both`): each must admit the project.
    AllOf(Vec<Admits>),
    /// Either method was enough and both passed: one of them must admit the project.
    AnyOf(Vec<Admits>),
}

impl Admits {
    /// The union over the secrets that matched (`scopes` of the matched ones; `None` =
    /// unbound).
    pub fn of_matched<'a>(scopes: impl IntoIterator<Item = Option<&'a SecretScope>>) -> Self {
        let mut bound = Vec::new();
        for scope in scopes {
            match scope {
                None => return Self::Any,
                Some(s) => bound.push(s.clone()),
            }
        }
        Self::Scopes(bound)
    }

    pub fn admits(&self, project_id: u64, project_path: Option<&str>) -> bool {
        match self {
            Self::Any => true,
            Self::Scopes(scopes) => scopes.iter().any(|s| s.admits(project_id, project_path)),
            Self::AllOf(all) => all.iter().all(|a| a.admits(project_id, project_path)),
            Self::AnyOf(any) => any.iter().any(|a| a.admits(project_id, project_path)),
        }
    }
}

/// One entry of a JSON secrets list. `secret` is `token` or `key`, by parameter.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    #[serde(alias = "token", alias = "key")]
    secret: String,
    #[serde(default)]
    projects: Option<Vec<u64>>,
    #[serde(default)]
    namespaces: Option<Vec<String>>,
}

/// Why a JSON secrets list cannot be used. Never holds a secret, nor any value from the text
/// (a serde message can quote a value, so only its position and category are kept).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopedListError {
    #[error(
        "the parameter starts with `[{{` but is not a JSON list of {{\"{field}\": ..., \"projects\": [ids], \"namespaces\": [paths]}} ({category} error at line {line}, column {column})"
    )]
    Malformed {
        field: &'static str,
        category: &'static str,
        line: usize,
        column: usize,
    },
    #[error(
        "entry {index} lists no project and no namespace, so it admits nothing: leave both out for an unbound secret"
    )]
    EmptyScope { index: usize },
    #[error("entry {index} has a namespace that is empty or only `/`")]
    EmptyNamespace { index: usize },
}

/// Whether a parameter's text is a JSON secrets list rather than the plain format.
pub fn is_scoped_list(text: &str) -> bool {
    text.trim_start().starts_with("[{")
}

/// The secrets of a JSON list, each with its scope (`None`: unbound). `field` names the
/// secret's key in the operator's words (`token` or `key`) for the error message.
pub fn parse_scoped_list(
    text: &str,
    field: &'static str,
) -> Result<Vec<(String, Option<SecretScope>)>, ScopedListError> {
    let entries: Vec<Entry> =
        serde_json::from_str(text).map_err(|e| ScopedListError::Malformed {
            field,
            category: match e.classify() {
                serde_json::error::Category::Io => "read",
                serde_json::error::Category::Syntax => "syntax",
                serde_json::error::Category::Data => "field",
                serde_json::error::Category::Eof => "unexpected end",
            },
            line: e.line(),
            column: e.column(),
        })?;
    entries
        .into_iter()
        .enumerate()
        .map(|(index, entry)| {
            let scope = match (entry.projects, entry.namespaces) {
                (None, None) => None,
                (projects, namespaces) => {
                    let projects: BTreeSet<u64> =
                        projects.unwrap_or_default().into_iter().collect();
                    let namespaces = namespaces
                        .unwrap_or_default()
                        .into_iter()
                        .map(|ns| {
                            let ns = ns.trim().trim_matches('/').to_lowercase();
                            if ns.is_empty() {
                                Err(ScopedListError::EmptyNamespace { index })
                            } else {
                                Ok(ns)
                            }
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    if projects.is_empty() && namespaces.is_empty() {
                        return Err(ScopedListError::EmptyScope { index });
                    }
                    Some(SecretScope {
                        projects,
                        namespaces,
                    })
                }
            };
            Ok((entry.secret, scope))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(projects: &[u64], namespaces: &[&str]) -> SecretScope {
        SecretScope {
            projects: projects.iter().copied().collect(),
            namespaces: namespaces.iter().map(|n| n.to_string()).collect(),
        }
    }

    #[test]
    fn a_scope_admits_its_ids_and_paths_below_its_namespaces_only() {
        let s = scope(&[12], &["acme/web"]);
        assert!(s.admits(12, None));
        assert!(s.admits(99, Some("acme/web/app")));
        assert!(s.admits(99, Some("ACME/Web/deep/app")));
        assert!(!s.admits(99, Some("acme/webshop/app")));
        assert!(
            !s.admits(99, Some("acme/web")),
            "a namespace is not a project"
        );
        assert!(!s.admits(99, None));
    }

    #[test]
    fn admits_combines_as_the_auth_mode_says() {
        let web = Admits::Scopes(vec![scope(&[1], &[])]);
        let ops = Admits::Scopes(vec![scope(&[2], &[])]);
        assert!(Admits::of_matched([Some(&scope(&[1], &[])), None]).admits(7, None));
        assert!(!Admits::AllOf(vec![web.clone(), ops.clone()]).admits(1, None));
        assert!(Admits::AnyOf(vec![web.clone(), ops]).admits(2, None));
        assert!(Admits::AllOf(vec![web, Admits::Any]).admits(1, None));
        assert!(!Admits::Scopes(vec![]).admits(1, None));
    }

    #[test]
    fn a_json_list_parses_with_scopes_and_unbound_entries() {
        let list = parse_scoped_list(
            r#"[{"token": "a b, c", "projects": [12, 34], "namespaces": ["/Acme/Web/"]},
                {"token": "plain"}]"#,
            "token",
        )
        .unwrap();
        assert_eq!(list[0].0, "a b, c");
        assert_eq!(list[0].1, Some(scope(&[12, 34], &["acme/web"])));
        assert_eq!(list[1], ("plain".to_owned(), None));
    }

    #[test]
    fn a_broken_list_says_where_and_never_quotes_the_text() {
        for (text, expected) in [
            (
                r#"[{"token": "s3cret-value", "projects": "s3cret-value"}]"#,
                "field error",
            ),
            (r#"[{"tokn": "s3cret-value"}]"#, "field error"),
            (r#"[{"token": "s3cret-value""#, "unexpected end"),
        ] {
            let e = parse_scoped_list(text, "token").unwrap_err().to_string();
            assert!(e.contains(expected), "{e}");
            assert!(!e.contains("s3cret"), "the error quotes the text: {e}");
        }
        assert_eq!(
            parse_scoped_list(r#"[{"token": "x", "projects": []}]"#, "token"),
            Err(ScopedListError::EmptyScope { index: 0 })
        );
        assert_eq!(
            parse_scoped_list(r#"[{"key": "x", "namespaces": ["/"]}]"#, "key"),
            Err(ScopedListError::EmptyNamespace { index: 0 })
        );
    }

    #[test]
    fn only_text_that_starts_with_a_list_of_objects_is_a_list() {
        assert!(is_scoped_list("  [{\"token\": \"x\"}]"));
        assert!(!is_scoped_list("[not json, a token with a bracket"));
        assert!(!is_scoped_list("plain-token"));
    }
}
