//! The scalar types of the manifest. Each one interpolates `${VAR}` and checks itself while the YAML
//! is deserialized, so a bad value is reported with the file position and field path that serde_yaml
//! attaches to the error. Each one also describes what it accepts as a JSON Schema (the manifest's
//! schema, `consul-registrar schema`, is derived from these types and those of `schema.rs`).

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::duration;
use super::interpolate::expand_current;

/// Reads a YAML scalar as written, interpolates strings, and parses the text with `parse` inside the
/// visitor, so that serde_yaml attaches the value's own position and path to any error. Numbers and
/// booleans are parsed from their text too, so `port: 8080` and `port: "${PORT:-8080}"` read alike.
fn deserialize_scalar<'de, D, T>(
    deserializer: D,
    parse: fn(&str) -> Result<T, String>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    struct ScalarVisitor<T>(fn(&str) -> Result<T, String>);
    impl<T> Visitor<'_> for ScalarVisitor<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a string, number or boolean")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
            let text = expand_current(v).map_err(E::custom)?;
            (self.0)(&text).map_err(E::custom)
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<T, E> {
            (self.0)(&v.to_string()).map_err(E::custom)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
            (self.0)(&v.to_string()).map_err(E::custom)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
            (self.0)(&v.to_string()).map_err(E::custom)
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
            (self.0)(&v.to_string()).map_err(E::custom)
        }
    }
    deserializer.deserialize_any(ScalarVisitor(parse))
}

/// A value written with a `${VAR}` reference: any string holding one (the value it expands to is
/// checked when the manifest is read, not by the schema).
fn interpolated() -> Value {
    json!({
        "type": "string",
        "pattern": "\\$\\{",
        "description": "a ${VAR} or ${VAR:-default} reference, checked once expanded"
    })
}

/// The schema of a scalar: its literal forms, or a `${VAR}` reference.
fn literal_or_interpolated(description: &str, literals: Value) -> Schema {
    let mut forms = match literals {
        Value::Array(forms) => forms,
        form => vec![form],
    };
    forms.push(interpolated());
    json_schema!({ "description": description, "anyOf": forms })
}

/// A duration as Consul and Go write it: numbers with units, `500ms`, `10s`, `1m30s`, `1.5h`.
const DURATION_PATTERN: &str = r"^\s*\+?(([0-9]+(\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h))+\s*$";

/// A duration of zero written with units (`0s`, `0.0ms`, `0h0m`).
const ZERO_DURATION_PATTERN: &str = r"^\s*\+?([0.]+(ns|us|µs|μs|ms|s|m|h))+\s*$";

/// The text of a doc comment, one paragraph.
fn doc_text(lines: &[&str]) -> String {
    lines.iter().map(|l| l.trim()).collect::<Vec<_>>().join(" ")
}

/// Declares a manifest scalar type: `$parse` turns the interpolated text into the value or says
/// what is wrong with it; `$schema` returns the JSON Schema forms it accepts besides a `${VAR}`
/// reference (its description is the type's doc comment).
macro_rules! manifest_scalar {
    ($(#[doc = $doc:literal])* $name:ident($inner:ty), schema: $schema:expr, $parse:expr) => {
        $(#[doc = $doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub $inner);

        impl JsonSchema for $name {
            fn schema_name() -> Cow<'static, str> {
                stringify!($name).into()
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                let literals: fn() -> Value = $schema;
                literal_or_interpolated(&doc_text(&[$($doc),*]), literals())
            }
        }

        impl $name {
            /// Parses the interpolated text of the value.
            pub fn parse(text: &str) -> Result<Self, String> {
                let parse: fn(&str) -> Result<$inner, String> = $parse;
                parse(text).map($name)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                deserialize_scalar(deserializer, Self::parse)
            }
        }
    };
}

manifest_scalar!(
    /// Free text after interpolation.
    Text(String),
    schema: || json!({ "type": ["string", "number", "boolean"] }),
    |s| Ok(s.to_string())
);

manifest_scalar!(
    /// A TCP port, 1 to 65535.
    Port(u16),
    schema: || json!([
        { "type": "integer", "minimum": 1, "maximum": 65535 },
        { "type": "string", "pattern": r"^\s*[0-9]{1,5}\s*$" }
    ]),
    |s| match s.trim().parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        Ok(p) => Err(format!("port {p} is out of range (1 to 65535)")),
        Err(_) => Err(format!("{s:?} is not a port number (1 to 65535)")),
    }
);

manifest_scalar!(
    /// A count of at least 1 (probe thresholds, weights).
    Count(u32),
    schema: || json!([
        { "type": "integer", "minimum": 1, "maximum": u32::MAX },
        { "type": "string", "pattern": r"^\s*\+?[0-9]+\s*$" }
    ]),
    |s| match s.trim().parse::<i64>() {
        Ok(n) if (1..=i64::from(u32::MAX)).contains(&n) => Ok(n as u32),
        Ok(n) => Err(format!("must be at least 1, got {n}")),
        Err(_) => Err(format!("{s:?} is not a whole number")),
    }
);

manifest_scalar!(
    /// A duration greater than zero, written as Consul does (`500ms`, `10s`, `1m30s`).
    PositiveDuration(Duration),
    schema: || json!({
        "type": "string",
        "pattern": DURATION_PATTERN,
        "not": { "pattern": ZERO_DURATION_PATTERN }
    }),
    |s| match duration::parse(s) {
        Ok(d) if d.is_zero() => Err("must be greater than zero".to_string()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
);

manifest_scalar!(
    /// A duration of zero or more (`0s` allowed), written as Consul does.
    Delay(Duration),
    schema: || json!([
        { "type": "string", "pattern": DURATION_PATTERN },
        { "type": "string", "pattern": r"^\s*[-+]?0\s*$" },
        { "type": "integer", "enum": [0] }
    ]),
    |s| duration::parse(s).map_err(|e| e.to_string())
);

manifest_scalar!(
    /// `true` or `false` (also from a variable).
    Flag(bool),
    schema: || json!([
        { "type": "boolean" },
        { "type": "string", "pattern": r"^\s*(true|True|TRUE|false|False|FALSE)\s*$" }
    ]),
    |s| match s.trim() {
        "true" | "True" | "TRUE" => Ok(true),
        "false" | "False" | "FALSE" => Ok(false),
        other => Err(format!("{other:?} is not a boolean (true or false)")),
    }
);

manifest_scalar!(
    /// A Consul service name: letters, digits, `-` and `_`, starting with a letter or digit, at most
    /// 63 characters, so that it is also a valid DNS label for Consul DNS.
    ServiceName(String),
    schema: || json!({ "type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$" }),
    |s| {
        if s.is_empty() {
            return Err("must not be empty".to_string());
        }
        if s.len() > 63 {
            return Err(format!("{s:?} is longer than 63 characters"));
        }
        let first_ok = s.starts_with(|c: char| c.is_ascii_alphanumeric());
        if !first_ok || !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(format!(
                "{s:?} is not a valid service name (letters, digits, '-' and '_', starting with a letter or digit)"
            ));
        }
        Ok(s.to_string())
    }
);

manifest_scalar!(
    /// A Consul service instance ID: not empty, no `/`, `?`, `#` or whitespace (it is used in URL paths).
    InstanceId(String),
    schema: || json!({
        "type": "string",
        "pattern": r"^[^/?#%\s]{1,255}$",
        "not": { "enum": [".", ".."] }
    }),
    |s| {
        if s.is_empty() {
            return Err("must not be empty".to_string());
        }
        if s.len() > 255 {
            return Err(format!("{s:?} is longer than 255 characters"));
        }
        if s == "." || s == ".." {
            return Err(format!("{s:?} is a URL path segment of its own (the ID goes into Consul's URLs); choose another ID"));
        }
        if let Some(c) = s.chars().find(|c| matches!(c, '/' | '?' | '#' | '%') || c.is_whitespace() || c.is_control()) {
            return Err(format!("{s:?} contains {c:?}, which cannot be used in a service ID"));
        }
        Ok(s.to_string())
    }
);

manifest_scalar!(
    /// A service address Consul accepts: a host name or IP, never the unspecified `0.0.0.0` / `::`.
    ServiceAddress(String),
    schema: || json!({
        "type": "string",
        "pattern": r"^\s*[^\s/]+\s*$",
        "not": { "pattern": r"^\s*(0\.0\.0\.0|::|\[::\])\s*$" }
    }),
    |s| {
        let s = s.trim();
        if s.is_empty() {
            return Err("must not be empty (is the variable that fills it set?)".to_string());
        }
        if let Ok(ip) = s.parse::<std::net::IpAddr>() {
            if ip.is_unspecified() {
                return Err(format!("{s} is not a routable address; Consul rejects it"));
            }
        } else if s.contains(|c: char| c.is_whitespace() || c == '/' || c == ':') {
            return Err(format!("{s:?} is neither an IP address nor a host name"));
        }
        Ok(s.to_string())
    }
);

manifest_scalar!(
    /// A meta key Consul accepts: `[A-Za-z0-9_-]`, at most 128 characters, not starting with the
    /// reserved `consul-` prefix.
    MetaKey(String),
    schema: || json!({
        "type": "string",
        "pattern": "^[A-Za-z0-9_-]{1,128}$",
        "not": { "pattern": "^[cC][oO][nN][sS][uU][lL]-" }
    }),
    |s| {
        if s.is_empty() || s.len() > 128 {
            return Err(format!("meta key {s:?} must have 1 to 128 characters"));
        }
        if !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            return Err(format!("meta key {s:?} may only contain letters, digits, '_' and '-'"));
        }
        if s.to_ascii_lowercase().starts_with("consul-") {
            return Err(format!("meta key {s:?} uses the prefix 'consul-', which Consul reserves"));
        }
        Ok(s.to_string())
    }
);

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for Text {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

/// How the probe talks to the app's health service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthMode {
    /// Streaming `Watch`, falling back to `Check` polling when the app answers UNIMPLEMENTED.
    #[default]
    Auto,
    /// Streaming `Watch` only.
    Watch,
    /// Unary `Check` every interval.
    Poll,
}

impl JsonSchema for HealthMode {
    fn schema_name() -> Cow<'static, str> {
        "HealthMode".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        literal_or_interpolated(
            "How the probe asks the app's health service: `auto` (Watch, falling back to Check polling when the app answers UNIMPLEMENTED), `watch` (Watch only) or `poll` (Check every interval).",
            json!({ "type": "string", "enum": ["auto", "watch", "poll"] }),
        )
    }
}

impl<'de> Deserialize<'de> for HealthMode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_scalar(deserializer, |text| match text.trim() {
            "auto" => Ok(HealthMode::Auto),
            "watch" => Ok(HealthMode::Watch),
            "poll" => Ok(HealthMode::Poll),
            other => Err(format!(
                "{other:?} is not a health mode (auto, watch or poll)"
            )),
        })
    }
}

/// What `/readyz` (the pod's readiness) requires of the instances in Consul (`readiness`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Readiness {
    /// Every instance passing in Consul for the probe's current verdict.
    #[default]
    All,
    /// At least one instance passing in Consul for the probe's current verdict.
    Any,
    /// Every instance held by Consul, whatever its status.
    Registered,
}

impl JsonSchema for Readiness {
    fn schema_name() -> Cow<'static, str> {
        "Readiness".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        literal_or_interpolated(
            "What makes the pod Ready: `all` (every instance passing in Consul), `any` (at least one) or `registered` (every instance in Consul, whatever its status).",
            json!({ "type": "string", "enum": ["all", "any", "registered"] }),
        )
    }
}

impl<'de> Deserialize<'de> for Readiness {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_scalar(deserializer, |text| match text.trim() {
            "all" => Ok(Readiness::All),
            "any" => Ok(Readiness::Any),
            "registered" => Ok(Readiness::Registered),
            other => Err(format!(
                "{other:?} is not a readiness rule (all, any or registered): all = every instance passing in Consul, any = at least one, registered = every instance in Consul whatever its status"
            )),
        })
    }
}

/// Which Consul API the sidecar registers through (`consul.mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ConsulModeName {
    /// The node's Consul client agent (`/v1/agent/...`, a TTL check).
    #[default]
    Agent,
    /// The servers' catalog (`/v1/catalog/...`, a virtual node, sessions as the crash net).
    Catalog,
}

impl JsonSchema for ConsulModeName {
    fn schema_name() -> Cow<'static, str> {
        "ConsulMode".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        literal_or_interpolated(
            "Which Consul API registers the instances: `agent` (the node's client agent) or `catalog` (the servers' catalog, for clusters without client agents).",
            json!({ "type": "string", "enum": ["agent", "catalog"] }),
        )
    }
}

impl<'de> Deserialize<'de> for ConsulModeName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_scalar(deserializer, |text| match text.trim() {
            "agent" => Ok(ConsulModeName::Agent),
            "catalog" => Ok(ConsulModeName::Catalog),
            other => Err(format!(
                "{other:?} is not a Consul mode (agent: a client agent on the node; catalog: the servers' catalog, for clusters without client agents)"
            )),
        })
    }
}

manifest_scalar!(
    /// A Consul node name: letters, digits, `-`, `_` and `.`, at most 253 characters (a
    /// Kubernetes node name fits).
    NodeName(String),
    schema: || json!({ "type": "string", "pattern": r"^\s*[A-Za-z0-9._-]{1,253}\s*$" }),
    |s| {
        let s = s.trim();
        if s.is_empty() {
            return Err("must not be empty".to_string());
        }
        if s.len() > 253 {
            return Err(format!("has {} characters; at most 253", s.len()));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            return Err(format!(
                "{s:?} contains {c:?}; a node name may hold letters, digits, '-', '_' and '.'"
            ));
        }
        Ok(s.to_string())
    }
);

manifest_scalar!(
    /// A Consul KV key prefix: segments of letters, digits, `-`, `_` and `.` separated by `/`,
    /// without a leading or trailing `/`.
    KeyPrefix(String),
    schema: || json!({
        "type": "string",
        "pattern": r"^\s*[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*/*\s*$"
    }),
    |s| {
        let s = s.trim().trim_end_matches('/');
        if s.is_empty() {
            return Err("must not be empty".to_string());
        }
        if s.starts_with('/') {
            return Err(format!("{s:?} starts with '/'; KV keys have no leading slash"));
        }
        for segment in s.split('/') {
            if segment.is_empty() || segment == "." || segment == ".." {
                return Err(format!("{s:?} has an empty, '.' or '..' segment"));
            }
            if let Some(c) = segment
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
            {
                return Err(format!(
                    "{s:?} contains {c:?}; use letters, digits, '-', '_', '.' and '/'"
                ));
            }
        }
        Ok(s.to_string())
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_checked() {
        assert_eq!(Port::parse("50051"), Ok(Port(50051)));
        assert!(Port::parse("0").unwrap_err().contains("out of range"));
        assert!(Port::parse("70000").unwrap_err().contains("out of range"));
        assert!(Port::parse("http").unwrap_err().contains("not a port"));
    }

    #[test]
    fn names_ids_and_addresses_are_checked() {
        assert!(ServiceName::parse("hello-world_1").is_ok());
        assert!(ServiceName::parse("").is_err());
        assert!(ServiceName::parse("-x").is_err());
        assert!(ServiceName::parse("a.b").is_err());
        assert!(InstanceId::parse("ns.pod-1.hello").is_ok());
        assert!(InstanceId::parse("a/b").is_err());
        assert!(ServiceAddress::parse("10.0.0.1").is_ok());
        assert!(ServiceAddress::parse("pod.example").is_ok());
        assert!(ServiceAddress::parse("0.0.0.0").is_err());
        assert!(ServiceAddress::parse("::").is_err());
        assert!(ServiceAddress::parse("").is_err());
        assert!(MetaKey::parse("version").is_ok());
        assert!(MetaKey::parse("consul-x").is_err());
        assert!(MetaKey::parse("a.b").is_err());
    }

    #[test]
    fn durations_and_counts_are_checked() {
        assert_eq!(
            PositiveDuration::parse("1m30s"),
            Ok(PositiveDuration(Duration::from_secs(90)))
        );
        assert!(
            PositiveDuration::parse("0s")
                .unwrap_err()
                .contains("greater than zero")
        );
        assert!(PositiveDuration::parse("-1s").is_err());
        assert_eq!(Delay::parse("0s"), Ok(Delay(Duration::ZERO)));
        assert_eq!(Count::parse("3"), Ok(Count(3)));
        assert!(Count::parse("0").is_err());
        assert!(Count::parse("-2").is_err());
        assert_eq!(Flag::parse("true"), Ok(Flag(true)));
        assert!(Flag::parse("yes").is_err());
    }
}
