//! A fieldless enum's text is its serde name, both ways: one source for what an item, a
//! registry entry, a metric dimension or a log line writes and for what parsing accepts.
//! [`serde_text!`](crate::text::serde_text) gives such an enum `Display` and `FromStr`.

use std::fmt;

use serde::Serialize;
use serde::de::{self, DeserializeOwned};

/// Why a text is not one of an enum's names; says which names are.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    /// Shown as ``"`cheap`: use spot or on-demand"``.
    #[error("`{given}`: use {}", one_of(allowed))]
    NotOneOf { given: String, allowed: Vec<String> },
    /// The type is not a fieldless enum (a programming error, not the operator's).
    #[error("{0}")]
    Other(String),
}

impl TextError {
    pub fn not_one_of(given: &str, allowed: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self::NotOneOf {
            given: given.to_owned(),
            allowed: allowed.into_iter().map(Into::into).collect(),
        }
    }
}

impl de::Error for TextError {
    fn custom<T: fmt::Display>(message: T) -> Self {
        Self::Other(message.to_string())
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        Self::not_one_of(variant, expected.iter().copied())
    }
}

/// The serde name of `value` (a fieldless enum's variant).
///
/// # Panics
/// When `value` does not serialize to a string: a type this is not for.
pub fn to_text<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(text)) => text,
        other => panic!(
            "{} is no fieldless enum: it serializes to {other:?}",
            std::any::type_name::<T>()
        ),
    }
}

/// The variant whose serde name (or alias) is `text`.
pub fn from_text<T: DeserializeOwned>(text: &str) -> Result<T, TextError> {
    T::deserialize(de::value::StrDeserializer::<TextError>::new(text))
}

/// Every text [`from_text`] accepts for `T`, in declaration order (serde's own list).
pub fn names<T: DeserializeOwned>() -> Vec<String> {
    // No variant is named by the empty text, so serde answers with the names it accepts.
    match from_text::<T>("") {
        Err(TextError::NotOneOf { allowed, .. }) => allowed,
        _ => panic!(
            "{} has no list of names: not a fieldless enum, or one with `#[serde(other)]`",
            std::any::type_name::<T>()
        ),
    }
}

/// `a`, `a or b`, `a, b or c`.
pub fn one_of(names: &[impl AsRef<str>]) -> String {
    match names {
        [] => String::new(),
        [only] => only.as_ref().to_owned(),
        [rest @ .., last] => {
            let rest: Vec<&str> = rest.iter().map(AsRef::as_ref).collect();
            format!("{} or {}", rest.join(", "), last.as_ref())
        }
    }
}

/// `Display` and `FromStr` (with [`TextError`]) from a fieldless enum's serde names.
macro_rules! serde_text {
    ($($name:ty),* $(,)?) => {$(
        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(&$crate::text::to_text(self))
            }
        }

        impl ::std::str::FromStr for $name {
            type Err = $crate::text::TextError;

            fn from_str(text: &str) -> Result<Self, Self::Err> {
                $crate::text::from_text(text)
            }
        }
    )*};
}
pub(crate) use serde_text;

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
    #[serde(rename_all = "kebab-case")]
    enum Colour {
        DeepRed,
        #[serde(alias = "grey")]
        Gray,
        Blue,
    }
    serde_text!(Colour);

    #[test]
    fn an_enum_reads_and_writes_its_serde_names() {
        assert_eq!(Colour::DeepRed.to_string(), "deep-red");
        assert_eq!("deep-red".parse(), Ok(Colour::DeepRed));
        assert_eq!("grey".parse(), Ok(Colour::Gray));
        assert_eq!(names::<Colour>(), ["deep-red", "gray", "grey", "blue"]);
    }

    #[test]
    fn an_unknown_text_is_answered_with_the_names() {
        let e = "DeepRed".parse::<Colour>().unwrap_err();
        assert_eq!(e.to_string(), "`DeepRed`: use deep-red, gray, grey or blue");
        assert_eq!(
            TextError::not_one_of("x", ["a", "b"]).to_string(),
            "`x`: use a or b"
        );
        assert_eq!(one_of(&["a"]), "a");
    }
}
