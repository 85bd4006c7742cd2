//! The sidecar's `/metrics` in Prometheus's text format, parsed into samples.

use std::collections::BTreeMap;

/// Prometheus text-format samples: (name, labels, value).
pub struct Metrics(pub Vec<(String, BTreeMap<String, String>, f64)>);

impl Metrics {
    /// Parses the text format; comments and lines that do not parse are skipped.
    pub fn parse(text: &str) -> Metrics {
        let mut out = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter_map(|kv| kv.split_once("=\""))
                .map(|(k, v)| (k.to_string(), v.trim_end_matches('"').to_string()))
                .collect();
            out.push((name.to_string(), labels, value));
        }
        Metrics(out)
    }

    /// The sum of every series of `name` whose labels include `label`=`value` (any, when None).
    pub fn sum(&self, name: &str, label: Option<(&str, &str)>) -> f64 {
        self.0
            .iter()
            .filter(|(n, labels, _)| {
                n == name && label.is_none_or(|(k, v)| labels.get(k).is_some_and(|x| x == v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }

    /// Consul requests (`consul_registrar_consul_requests_total`) by `"<operation> <status>"`.
    pub fn consul_requests(&self) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for (n, labels, v) in &self.0 {
            if n == "consul_registrar_consul_requests_total" {
                let key = format!(
                    "{} {}",
                    labels.get("operation").map_or("?", String::as_str),
                    labels.get("status").map_or("?", String::as_str)
                );
                *out.entry(key).or_insert(0.0) += v;
            }
        }
        out
    }
}
