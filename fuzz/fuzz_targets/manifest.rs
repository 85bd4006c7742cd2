//! Manifest parsing and validation: any bytes either resolve into a manifest that keeps every
//! documented rule, or are refused with errors that name a place and a problem. Never a panic.
#![no_main]

use std::collections::HashMap;

use consul_registrar::manifest::{Environment, ManifestErrors, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let env = Environment::Fixed(HashMap::from([
        ("POD_IP".to_string(), "10.1.2.3".to_string()),
        ("POD_NAME".to_string(), "web-0".to_string()),
        ("PORT".to_string(), "8080".to_string()),
    ]));
    match parse(text, "fuzz.yaml", &env) {
        Ok(m) => {
            assert!(!m.services.is_empty());
            let mut ids = std::collections::HashSet::new();
            for s in &m.services {
                assert!(ids.insert(s.id.clone()), "duplicate id {}", s.id);
                assert!(s.port >= 1 && s.health.port >= 1);
                assert!(!s.name.is_empty() && !s.id.is_empty());
                assert!(s.check.ttl > s.health.interval + s.health.timeout);
                assert!(s.health.success_threshold >= 1 && s.health.failure_threshold >= 1);
                assert!(s.meta.len() <= 64);
                assert!(s.meta.values().all(|v| v.len() <= 512), "a meta value Consul refuses");
                assert!(s.id != "." && s.id != "..", "a path segment as id");
                let max = consul_registrar::manifest::duration::MAX;
                for d in [s.check.ttl, s.check.deregister_critical_service_after, s.health.interval, s.health.timeout, s.health.initial_delay] {
                    assert!(d <= max, "{d:?} beyond Go's largest duration");
                }
                assert_eq!(s.meta.get("managed-by").map(String::as_str), Some("consul-registrar"));
            }
        }
        Err(ManifestErrors::Unreadable { .. }) => unreachable!("parse reads no file"),
        Err(ManifestErrors::Invalid(errors)) => {
            assert!(!errors.is_empty());
            // YAML breaks lines at \n, \r\n and a lone \r: count every \n and \r (an upper bound).
            let lines = text.bytes().filter(|b| matches!(b, b'\n' | b'\r')).count() + 1;
            for e in &errors {
                assert!(!e.problem.is_empty(), "an error without a problem: {e:?}");
                assert_eq!(e.file, "fuzz.yaml");
                if let Some((line, column)) = e.position {
                    assert!(line >= 1 && column >= 1, "{e:?}");
                    assert!(line <= lines + 1, "line {line} past the end ({lines} lines): {e:?}");
                }
                let shown = e.to_string();
                assert!(shown.starts_with("fuzz.yaml"), "{shown}");
            }
        }
    }
});
