//! `${VAR}` and `${VAR:-default}` interpolation of manifest values from the environment, so that the
//! Kubernetes Downward API (POD_IP, POD_NAME, POD_NAMESPACE, POD_UID, HOST_IP, NODE_NAME) fills the manifest in.
//!
//! Interpolation happens per scalar value while the YAML is deserialized (never on the raw text), so a
//! variable can't inject YAML structure and an error points at the value that used the variable.
//! `$$` is a literal `$`.

use std::cell::RefCell;
use std::collections::HashMap;

/// Where variables come from: the process environment, or a fixed map in tests and `validate`.
#[derive(Debug, Clone, Default)]
pub enum Environment {
    #[default]
    Process,
    Fixed(HashMap<String, String>),
}

impl Environment {
    /// The value of `name`; an empty value counts as set (as in POSIX `${VAR:-default}`, it does not).
    pub fn get(&self, name: &str) -> Option<String> {
        match self {
            Environment::Process => std::env::var(name).ok(),
            Environment::Fixed(map) => map.get(name).cloned(),
        }
    }

    /// The value of `name` when it is set and not empty.
    pub fn non_empty(&self, name: &str) -> Option<String> {
        self.get(name).filter(|v| !v.is_empty())
    }
}

/// Why a value could not be interpolated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InterpolateError {
    #[error("environment variable {0} is not set (write ${{{0}:-default}} to give a default)")]
    Unset(String),
    #[error("unterminated ${{ in {0:?}")]
    Unterminated(String),
    #[error("invalid variable name {name:?} in {input:?}")]
    BadName { name: String, input: String },
    #[error(
        "a default may not hold a variable (no nesting) in {0:?}: the default ends at the first }}"
    )]
    NestedDefault(String),
}

/// Expands `${VAR}`, `${VAR:-default}` and `$$` in `input`.
pub fn expand(input: &str, env: &Environment) -> Result<String, InterpolateError> {
    if !input.contains('$') {
        return Ok(input.to_string());
    }
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body_and_tail) = after.strip_prefix('{') {
            let end = body_and_tail
                .find('}')
                .ok_or_else(|| InterpolateError::Unterminated(input.to_string()))?;
            let body = &body_and_tail[..end];
            let (name, default) = match body.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (body, None),
            };
            if default.is_some_and(|d| d.contains("${")) {
                return Err(InterpolateError::NestedDefault(input.to_string()));
            }
            let valid = !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(InterpolateError::BadName {
                    name: name.to_string(),
                    input: input.to_string(),
                });
            }
            match (env.non_empty(name), default) {
                (Some(value), _) => out.push_str(&value),
                (None, Some(default)) => out.push_str(default),
                (None, None) => return Err(InterpolateError::Unset(name.to_string())),
            }
            rest = &body_and_tail[end + 1..];
        } else {
            // A lone `$` not followed by `{` or `$` is kept as written.
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

thread_local! {
    static CURRENT: RefCell<Option<Environment>> = const { RefCell::new(None) };
}

/// Runs `f` (a deserialization) with `env` as the environment that interpolated values read.
pub(crate) fn with_environment<T>(env: &Environment, f: impl FnOnce() -> T) -> T {
    struct Reset(Option<Environment>);
    impl Drop for Reset {
        fn drop(&mut self) {
            CURRENT.with(|c| *c.borrow_mut() = self.0.take());
        }
    }
    let previous = CURRENT.with(|c| c.borrow_mut().replace(env.clone()));
    let _reset = Reset(previous);
    f()
}

/// Expands `input` with the environment set by [`with_environment`] (the process environment
/// outside of it).
pub(crate) fn expand_current(input: &str) -> Result<String, InterpolateError> {
    CURRENT.with(|c| match &*c.borrow() {
        Some(env) => expand(input, env),
        None => expand(input, &Environment::Process),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::env;

    #[test]
    fn expands_variables_and_defaults() {
        let e = env(&[("POD_IP", "10.1.2.3"), ("EMPTY", "")]);
        assert_eq!(expand("${POD_IP}", &e).as_deref(), Ok("10.1.2.3"));
        assert_eq!(
            expand("ip=${POD_IP}:80", &e).as_deref(),
            Ok("ip=10.1.2.3:80")
        );
        assert_eq!(expand("${NOPE:-fallback}", &e).as_deref(), Ok("fallback"));
        assert_eq!(expand("${EMPTY:-fallback}", &e).as_deref(), Ok("fallback"));
        assert_eq!(expand("${NOPE:-}", &e).as_deref(), Ok(""));
        assert_eq!(expand("cost $$5 $x", &e).as_deref(), Ok("cost $5 $x"));
        assert_eq!(expand("plain", &e).as_deref(), Ok("plain"));
    }

    #[test]
    fn unset_without_default_is_an_error() {
        let e = env(&[]);
        assert_eq!(
            expand("${POD_IP}", &e),
            Err(InterpolateError::Unset("POD_IP".into()))
        );
        assert!(matches!(
            expand("${POD_IP", &e),
            Err(InterpolateError::Unterminated(_))
        ));
        assert!(matches!(
            expand("${1X}", &e),
            Err(InterpolateError::BadName { .. })
        ));
        assert!(matches!(
            expand("${}", &e),
            Err(InterpolateError::BadName { .. })
        ));
    }

    #[test]
    fn a_variable_inside_a_default_is_an_error_not_literal_text() {
        // Not supported: the default would end at the inner `}` and `${B}` be taken as text.
        let e = env(&[("B", "b")]);
        assert!(matches!(
            expand("${A:-${B}}", &e),
            Err(InterpolateError::NestedDefault(_))
        ));
    }
}
