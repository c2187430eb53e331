//! The job cache (`cache:` in `.gitlab-ci.yml`) on both routes, in the stack's cache bucket,
//! laid out as gitlab-runner lays out a shared S3 cache (`cache/cache.go`
//! `generateObjectName` with `Shared = true`): `<PATH>/project/<project id>/<cache key>`, one
//! prefix per project. EC2 runners are gitlab-runner itself, configured by the user-data; the
//! in-Lambda shell runner follows the same decisions, which live here: the key's sanitation,
//! the fallback keys, `policy` and `when`, and which archive paths are allowed.

use std::collections::HashMap;

/// The environment variable with the cache bucket's name (empty or unset: no cache). Set by
/// the template for the provision function (EC2 user-data) and the shell runner.
pub const BUCKET_ENV: &str = "CACHE_BUCKET_NAME";

/// gitlab-runner's `[runners.cache] Path`: every object is under it.
pub const PATH: &str = "cache";

/// The prefix of one project's objects: `cache/project/<id>/`.
pub fn project_prefix(project_id: u64) -> String {
    format!("{PATH}/project/{project_id}/")
}

/// The object of a (sanitized) key, or `None` when the key would leave the project's prefix
/// (gitlab-runner: "computed cache path outside of project bucket").
pub fn object_key(project_id: u64, key: &str) -> Option<String> {
    let base = project_prefix(project_id);
    let cleaned = clean_path(&format!("{base}{key}"));
    (cleaned.starts_with(&base) && cleaned.len() > base.len()).then_some(cleaned)
}

/// `path.Clean` of Go for a relative, slash-separated path (no leading `/` kept).
fn clean_path(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for segment in path.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    out.join("/")
}

/// gitlab-runner's `sanitizeCacheKey`: `%2f`/`%2e` decoded, `\` as `/`, rooted and cleaned so
/// that `..` cannot climb, trailing spaces and empty last segments dropped. Returns the key
/// and, when it changed, the warning gitlab-runner prints. `None`: nothing usable is left.
pub fn sanitize_key(raw: &str) -> (Option<String>, Option<String>) {
    if raw.is_empty() {
        return (None, None);
    }
    let decoded = raw
        .replace("%2f", "/")
        .replace("%2F", "/")
        .replace("%2e", ".")
        .replace("%2E", ".")
        .replace('\\', "/");
    let mut segments: Vec<String> = clean_path(&decoded)
        .split('/')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    // The last element must not be empty or end in white space.
    while let Some(last) = segments.pop() {
        let trimmed = last.trim_end();
        if !trimmed.is_empty() {
            segments.push(trimmed.to_owned());
            break;
        }
    }
    let key = clean_path(&segments.join("/"));
    if key.is_empty() {
        return (
            None,
            Some(format!("cache key {raw:?} could not be sanitized")),
        );
    }
    let warning = (key != raw).then(|| format!("cache key {raw:?} sanitized to {key:?}"));
    (Some(key), warning)
}

/// `$NAME` and `${NAME}` from the job's variables (unknown ones expand to nothing), as
/// gitlab-runner's `ExpandValue` does for cache keys.
pub fn expand(value: &str, vars: &HashMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, used) = if let Some(braced) = after.strip_prefix('{') {
            match braced.find('}') {
                Some(end) => (&braced[..end], end + 2),
                None => ("", 0),
            }
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], end)
        };
        if used == 0 {
            out.push('$');
            rest = after;
            continue;
        }
        out.push_str(vars.get(name).map(String::as_str).unwrap_or_default());
        rest = &after[used..];
    }
    out.push_str(rest);
    out
}

/// `cache:policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    PullPush,
    Pull,
    Push,
}

impl Policy {
    /// Empty is `pull-push`; anything else unknown is an error (gitlab-runner fails the stage).
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "" | "pull-push" => Ok(Self::PullPush),
            "pull" => Ok(Self::Pull),
            "push" => Ok(Self::Push),
            other => Err(format!("unknown cache policy {other}")),
        }
    }
    pub fn pulls(self) -> bool {
        self != Self::Push
    }
    pub fn pushes(self) -> bool {
        self != Self::Pull
    }
}

/// `cache:when`: whether a job that succeeded (or not) saves the cache.
pub fn saves_when(when: &str, job_succeeded: bool) -> bool {
    matches!(
        (when, job_succeeded),
        ("" | "on_success" | "always", true) | ("on_failure" | "always", false)
    )
}

/// The keys a restore tries, in order: the job's key (or `<job name>/<ref>` when it has
/// none), then `fallback_keys`, then `CACHE_FALLBACK_KEY` (never one ending in
/// `-protected`: an unprotected job must not read a protected branch's cache). Sanitized;
/// the warnings are for the job log.
pub fn restore_keys(
    key: &str,
    fallback_keys: &[String],
    vars: &HashMap<String, String>,
    warnings: &mut Vec<String>,
) -> Vec<String> {
    fn add(keys: &mut Vec<String>, raw: &str, warnings: &mut Vec<String>) {
        let (key, warning) = sanitize_key(raw);
        warnings.extend(warning);
        if let Some(key) = key
            && !keys.contains(&key)
        {
            keys.push(key);
        }
    }
    let mut keys = Vec::new();
    add(&mut keys, &primary_key(key, vars), warnings);
    if keys.is_empty() {
        return keys;
    }
    for fallback in fallback_keys {
        add(&mut keys, &expand(fallback, vars), warnings);
    }
    if let Some(fallback) = vars.get("CACHE_FALLBACK_KEY").filter(|k| !k.is_empty()) {
        if fallback.ends_with("-protected") {
            warnings.push(format!(
                "CACHE_FALLBACK_KEY {fallback:?} not allowed to end in \"-protected\""
            ));
        } else {
            add(&mut keys, fallback, warnings);
        }
    }
    keys
}

/// The job's key as written (expanded), or gitlab-runner's default `<job name>/<ref>`.
pub fn primary_key(key: &str, vars: &HashMap<String, String>) -> String {
    if key.is_empty() {
        let name = vars.get("CI_JOB_NAME").map(String::as_str).unwrap_or("");
        let git_ref = vars
            .get("CI_COMMIT_REF_NAME")
            .map(String::as_str)
            .unwrap_or("");
        clean_path(&format!("{name}/{git_ref}"))
    } else {
        expand(key, vars)
    }
}

/// Why a `cache:paths` entry is refused: it must stay inside the project directory
/// (gitlab-runner: "artifact path is not a subpath of project directory").
pub fn path_problem(path: &str) -> Option<String> {
    if path.starts_with('/') || path.starts_with('\\') {
        return Some(format!(
            "cache path {path:?} is absolute: cache paths are relative to the project directory"
        ));
    }
    let mut depth: i32 = 0;
    for segment in path.split(['/', '\\']) {
        match segment {
            "" | "." => {}
            ".." => {
                depth -= 1;
                if depth < 0 {
                    return Some(format!(
                        "cache path {path:?} is not a subpath of the project directory"
                    ));
                }
            }
            _ => depth += 1,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn objects_are_under_their_project_and_never_another() {
        assert_eq!(
            object_key(42, "deps-main").as_deref(),
            Some("cache/project/42/deps-main")
        );
        assert_eq!(
            object_key(42, "a/b").as_deref(),
            Some("cache/project/42/a/b")
        );
        assert_eq!(object_key(42, "../43/x"), None);
        assert_eq!(object_key(42, ".."), None);
        assert_eq!(object_key(42, ""), None);
    }

    #[test]
    fn keys_are_sanitized_like_gitlab_runner() {
        assert_eq!(sanitize_key("main"), (Some("main".into()), None));
        let (key, warning) = sanitize_key("../../other/key");
        assert_eq!(key.as_deref(), Some("other/key"));
        assert!(warning.unwrap().contains("sanitized to \"other/key\""));
        assert_eq!(sanitize_key("a%2F..%2F..%2Fb").0.as_deref(), Some("b"));
        assert_eq!(sanitize_key("a\\b ").0.as_deref(), Some("a/b"));
        assert_eq!(sanitize_key("a/ /").0.as_deref(), Some("a"));
        assert!(sanitize_key("/..").0.is_none());
        assert_eq!(sanitize_key(""), (None, None));
    }

    #[test]
    fn variables_expand_in_keys() {
        let v = vars(&[("CI_COMMIT_REF_SLUG", "main"), ("X", "1")]);
        assert_eq!(expand("deps-$CI_COMMIT_REF_SLUG", &v), "deps-main");
        assert_eq!(expand("${X}-$Y-$", &v), "1--$");
        assert_eq!(expand("${unterminated", &v), "${unterminated");
    }

    #[test]
    fn restore_tries_the_key_then_fallbacks_then_the_variable() {
        let v = vars(&[
            ("CI_COMMIT_REF_SLUG", "feature"),
            ("CACHE_FALLBACK_KEY", "deps-main"),
            ("CI_JOB_NAME", "test"),
            ("CI_COMMIT_REF_NAME", "feature/x"),
        ]);
        let mut warnings = Vec::new();
        let keys = restore_keys(
            "deps-$CI_COMMIT_REF_SLUG",
            &["deps-default".into(), "deps-main".into()],
            &v,
            &mut warnings,
        );
        assert_eq!(keys, ["deps-feature", "deps-default", "deps-main"]);
        assert!(warnings.is_empty());
        // No key: `<job name>/<ref>`.
        assert_eq!(
            restore_keys("", &[], &v, &mut warnings)[0],
            "test/feature/x"
        );
        let protected = vars(&[("CACHE_FALLBACK_KEY", "deps-main-protected")]);
        let keys = restore_keys("k", &[], &protected, &mut warnings);
        assert_eq!(keys, ["k"]);
        assert!(warnings.iter().any(|w| w.contains("-protected")));
    }

    #[test]
    fn policy_and_when_decide_pull_and_push() {
        assert_eq!(Policy::parse(""), Ok(Policy::PullPush));
        assert!(Policy::parse("pull").unwrap().pulls() && !Policy::parse("pull").unwrap().pushes());
        assert!(!Policy::parse("push").unwrap().pulls() && Policy::parse("push").unwrap().pushes());
        assert!(Policy::parse("sometimes").is_err());
        assert!(saves_when("", true) && !saves_when("", false));
        assert!(saves_when("on_failure", false) && !saves_when("on_failure", true));
        assert!(saves_when("always", true) && saves_when("always", false));
        assert!(!saves_when("never", true));
    }

    #[test]
    fn paths_outside_the_project_are_refused() {
        for ok in ["node_modules/", "a/../b", ".cache", "**/*.o", "./x"] {
            assert_eq!(path_problem(ok), None, "{ok}");
        }
        for bad in ["/etc", "../x", "a/../../x", "\\x", ".."] {
            assert!(path_problem(bad).is_some(), "{bad}");
        }
    }
}
