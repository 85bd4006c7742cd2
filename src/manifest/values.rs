//! The scalar types of the manifest. Each one interpolates `${VAR}` and checks itself while the YAML
//! is deserialized, so a bad value is reported with the file position and field path that serde_yaml
//! attaches to the error.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

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

/// Declares a manifest scalar type: `$parse` turns the interpolated text into the value or says
/// what is wrong with it.
macro_rules! manifest_scalar {
    ($(#[$doc:meta])* $name:ident($inner:ty), $parse:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub $inner);

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
    |s| Ok(s.to_string())
);

manifest_scalar!(
    /// A TCP port, 1 to 65535.
    Port(u16),
    |s| match s.trim().parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        Ok(p) => Err(format!("port {p} is out of range (1 to 65535)")),
        Err(_) => Err(format!("{s:?} is not a port number (1 to 65535)")),
    }
);

manifest_scalar!(
    /// A count of at least 1 (probe thresholds, weights).
    Count(u32),
    |s| match s.trim().parse::<i64>() {
        Ok(n) if (1..=i64::from(u32::MAX)).contains(&n) => Ok(n as u32),
        Ok(n) => Err(format!("must be at least 1, got {n}")),
        Err(_) => Err(format!("{s:?} is not a whole number")),
    }
);

manifest_scalar!(
    /// A duration greater than zero, written as Consul does (`500ms`, `10s`, `1m30s`).
    PositiveDuration(Duration),
    |s| match duration::parse(s) {
        Ok(d) if d.is_zero() => Err("must be greater than zero".to_string()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
);

manifest_scalar!(
    /// A duration of zero or more (`0s` allowed), written as Consul does.
    Delay(Duration),
    |s| duration::parse(s).map_err(|e| e.to_string())
);

manifest_scalar!(
    /// `true` or `false` (also from a variable).
    Flag(bool),
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

/// Which Consul API the sidecar registers through (`consul.mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ConsulModeName {
    /// The node's Consul client agent (`/v1/agent/...`, a TTL check).
    #[default]
    Agent,
    /// The servers' catalog (`/v1/catalog/...`, a virtual node, sessions as the crash net).
    Catalog,
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
