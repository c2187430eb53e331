//! A function's environment, read the same way for every variable and every function:
//! trimmed, empty = unset, and each problem names the variable and what to put in it.

/// Why a variable cannot be used; each function's configuration error wraps it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EnvError(pub String);

/// The environment through a lookup (the process's, or a test's map).
pub struct Env<G>(pub G);

impl<G: Fn(&str) -> Option<String>> Env<G> {
    pub fn value(&self, name: &str) -> Option<String> {
        (self.0)(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }

    /// `what`: what the variable holds, for the message when it is missing.
    pub fn required(&self, name: &str, what: &str) -> Result<String, EnvError> {
        self.value(name)
            .ok_or_else(|| EnvError(format!("{name} is not set ({what})")))
    }

    pub fn number(&self, name: &str, default: u64) -> Result<u64, EnvError> {
        self.whole(name, default, "a whole number")
    }

    pub fn seconds(&self, name: &str, default: u64) -> Result<u64, EnvError> {
        self.whole(name, default, "a whole number of seconds")
    }

    fn whole(&self, name: &str, default: u64, kind: &str) -> Result<u64, EnvError> {
        match self.value(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| EnvError(format!("{name}=`{v}` is not {kind}"))),
        }
    }

    /// Comma-separated, each item trimmed, empty items dropped.
    pub fn list(&self, name: &str) -> Vec<String> {
        self.value(name)
            .map(|v| {
                v.split(',')
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// One of `choices` by its text (`default` when unset).
    pub fn choice<T: Copy>(
        &self,
        name: &str,
        default: &str,
        choices: &[(&str, T)],
    ) -> Result<T, EnvError> {
        let v = self.value(name).unwrap_or_else(|| default.to_owned());
        choices
            .iter()
            .find(|(text, _)| *text == v)
            .map(|(_, choice)| *choice)
            .ok_or_else(|| {
                let names: Vec<_> = choices.iter().map(|(text, _)| *text).collect();
                EnvError(format!("{name}=`{v}`: use {}", names.join(" or ")))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_trimmed_and_problems_name_the_variable() {
        let env = Env(|name: &str| match name {
            "A" => Some("  x ".into()),
            "EMPTY" => Some("  ".into()),
            "N" => Some("ten".into()),
            "L" => Some("a, ,b,".into()),
            _ => None,
        });
        assert_eq!(env.value("A").as_deref(), Some("x"));
        assert_eq!(env.value("EMPTY"), None);
        assert_eq!(
            env.required("EMPTY", "the table").unwrap_err().0,
            "EMPTY is not set (the table)"
        );
        assert_eq!(env.number("MISSING", 7), Ok(7));
        assert_eq!(
            env.seconds("N", 1).unwrap_err().0,
            "N=`ten` is not a whole number of seconds"
        );
        assert_eq!(env.list("L"), ["a", "b"]);
        assert_eq!(
            env.choice("A", "y", &[("y", 1), ("z", 2)]).unwrap_err().0,
            "A=`x`: use y or z"
        );
    }
}
