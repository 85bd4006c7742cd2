use super::*;

/// A fixed environment of `pairs` (also used by the interpolation tests).
pub(super) fn env(pairs: &[(&str, &str)]) -> Environment {
    Environment::Fixed(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

fn errors(text: &str, e: &Environment) -> Vec<String> {
    match parse(text, "m.yaml", e) {
        Ok(m) => panic!("expected errors, got {m:#?}"),
        Err(errs) => errs.problems().iter().map(ToString::to_string).collect(),
    }
}

const MINIMAL: &str = "services:\n  - name: hello\n    port: 50051\n";

#[test]
fn minimal_manifest_gets_documented_defaults() {
    let e = env(&[
        ("POD_NAME", "hello-7d9f"),
        ("POD_NAMESPACE", "shop"),
        ("POD_IP", "10.1.2.3"),
        ("POD_UID", "5b0e1a4c-7f7e"),
        ("NODE_NAME", "node-a"),
    ]);
    let m = parse(MINIMAL, "m.yaml", &e).expect("valid");
    assert_eq!(m.consul.address, "http://127.0.0.1:8500");
    assert_eq!(m.admin_address.to_string(), DEFAULT_ADMIN_ADDRESS);
    assert_eq!(m.drain, DrainPolicy::default());
    let s = &m.services[0];
    assert_eq!(s.id, "hello.shop.hello-7d9f");
    assert_eq!(s.address.as_deref(), Some("10.1.2.3"));
    assert_eq!(s.health.address, "10.1.2.3");
    assert_eq!(s.health.port, 50051);
    assert_eq!(s.health.mode, HealthMode::Auto);
    assert_eq!(s.check.ttl, Duration::from_secs(10));
    assert_eq!(s.check.id, "consul-registrar:hello.shop.hello-7d9f");
    assert_eq!(
        s.meta.get("managed-by").map(String::as_str),
        Some("consul-registrar")
    );
    assert_eq!(
        s.meta.get("pod-name").map(String::as_str),
        Some("hello-7d9f")
    );
    assert_eq!(s.meta.get("node-name").map(String::as_str), Some("node-a"));
    assert_eq!(
        s.meta.get("pod-uid").map(String::as_str),
        Some("5b0e1a4c-7f7e")
    );
}

#[test]
fn default_id_outside_a_pod_uses_host_and_port() {
    let m = parse(MINIMAL, "m.yaml", &env(&[("HOSTNAME", "box")])).expect("valid");
    assert_eq!(m.services[0].id, "hello.box.50051");
    assert_eq!(m.services[0].address, None);
    assert_eq!(m.services[0].health.address, "127.0.0.1");
}

#[test]
fn interpolates_values_including_numbers() {
    let text = "consul:\n  address: ${CONSUL:-127.0.0.1:18500}\nservices:\n  - name: hello\n    id: ${POD_NAME}-x\n    port: ${PORT:-7000}\n    tags: [\"v-${VERSION:-1}\"]\n";
    let m = parse(
        text,
        "m.yaml",
        &env(&[("POD_NAME", "p1"), ("PORT", "9000")]),
    )
    .expect("valid");
    assert_eq!(m.consul.address, "http://127.0.0.1:18500");
    assert_eq!(m.services[0].id, "p1-x");
    assert_eq!(m.services[0].port, 9000);
    assert_eq!(m.services[0].tags, vec!["v-1".to_string()]);
}

#[test]
fn unset_variable_is_reported_at_its_value() {
    let text = "services:\n  - name: hello\n    port: 1\n    address: ${POD_IP}\n";
    let errs = errors(text, &env(&[]));
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].starts_with(
            "m.yaml:4:14: services[0].address: environment variable POD_IP is not set"
        ),
        "{errs:?}"
    );
}

#[test]
fn unknown_fields_are_rejected_with_position_and_path() {
    let text = "services:\n  - name: hello\n    port: 1\n    health:\n      intervall: 1s\n";
    let errs = errors(text, &env(&[]));
    assert!(
        errs[0].starts_with("m.yaml:5:7: services[0].health: unknown field `intervall`"),
        "{errs:?}"
    );
}

#[test]
fn bad_values_name_file_line_column_and_field() {
    let cases = [
        (
            "services:\n  - name: hello\n    port: 70000\n",
            "m.yaml:3:11: services[0].port: port 70000 is out of range",
        ),
        (
            "services:\n  - name: \"\"\n    port: 1\n",
            "m.yaml:2:11: services[0].name: must not be empty",
        ),
        (
            "services:\n  - name: he.llo\n    port: 1\n",
            "m.yaml:2:11: services[0].name: \"he.llo\" is not a valid service name",
        ),
        (
            "services:\n  - name: a\n    port: 1\n    health:\n      timeout: 0s\n",
            "m.yaml:5:16: services[0].health.timeout: must be greater than zero",
        ),
        (
            "services:\n  - name: a\n    port: 1\n    health:\n      interval: -1s\n",
            "m.yaml:5:17: services[0].health.interval: negative durations are not allowed",
        ),
        (
            "services:\n  - name: a\n    port: 1\n    address: 0.0.0.0\n",
            "m.yaml:4:14: services[0].address: 0.0.0.0 is not a routable address",
        ),
        (
            "services:\n  - name: a\n    port: 1\n    health:\n      mode: stream\n",
            "m.yaml:5:13: services[0].health.mode: \"stream\" is not a health mode",
        ),
        (
            "services:\n  - name: a\n    port: [1]\n",
            "m.yaml:3:11: services[0].port: invalid type: sequence",
        ),
    ];
    for (text, want) in cases {
        let errs = errors(text, &env(&[]));
        assert!(
            errs[0].starts_with(want),
            "for {text:?}\n got {errs:?}\nwant {want}"
        );
    }
}

#[test]
fn cross_field_rules_report_every_problem() {
    let text = "\
services:
  - name: a
    id: same
    port: 1
    check:
      ttl: 1s
  - name: b
    id: same
    port: 2
    meta:
      managed-by: me
    check:
      deregisterCriticalServiceAfter: 30s
";
    let errs = errors(text, &env(&[]));
    assert_eq!(errs.len(), 4, "{errs:#?}");
    assert!(
        errs[0].starts_with(
            "m.yaml:6:12: services[0].check.ttl: ttl 1s must be longer than one probe cycle"
        ),
        "{errs:?}"
    );
    assert!(errs.iter().any(|e| e.starts_with("m.yaml:11:7: services[1].meta: meta key \"managed-by\" is set by consul-registrar itself")), "{errs:?}");
    assert!(errs.iter().any(|e| e.starts_with("m.yaml:13:39: services[1].check.deregisterCriticalServiceAfter: 30s is below Consul's minimum of 1m")), "{errs:?}");
    assert!(
        errs.iter()
            .any(|e| e.starts_with("m.yaml:8:9: services[1].id: duplicate instance id \"same\"")),
        "{errs:?}"
    );
}

#[test]
fn empty_services_and_broken_yaml_are_errors() {
    let errs = errors("services: []\n", &env(&[]));
    assert!(
        errs[0].starts_with("m.yaml:1:11: services: at least one service is required"),
        "{errs:?}"
    );
    let errs = errors(
        "services:\n  - name: a\n    port: 1\n   tags: x\n",
        &env(&[]),
    );
    assert!(errs[0].starts_with("m.yaml:4:"), "{errs:?}");
    let errs = errors("services:\n  - name: a\n    port: 1\n  x: : :\n", &env(&[]));
    assert!(errs[0].starts_with("m.yaml:4:"), "{errs:?}");
    let errs = errors("consul: {}\n", &env(&[]));
    assert!(errs[0].contains("missing field `services`"), "{errs:?}");
}

#[test]
fn consul_environment_fills_what_the_manifest_leaves_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "from-file\n").expect("write");
    let e = env(&[
        ("CONSUL_HTTP_ADDR", "consul.local:8501"),
        ("CONSUL_HTTP_SSL", "true"),
        ("CONSUL_HTTP_TOKEN", "from-env"),
        (
            "CONSUL_HTTP_TOKEN_FILE",
            token_file.to_str().expect("utf-8"),
        ),
        ("CONSUL_NAMESPACE", "team"),
        ("CONSUL_TLS_SERVER_NAME", "server.dc1.consul"),
    ]);
    let m = parse(MINIMAL, "m.yaml", &e).expect("valid");
    assert_eq!(m.consul.address, "https://consul.local:8501");
    assert_eq!(
        m.consul.token.as_ref().map(Secret::expose),
        Some("from-file")
    );
    assert_eq!(m.consul.namespace.as_deref(), Some("team"));
    assert_eq!(
        m.consul.tls.server_name.as_deref(),
        Some("server.dc1.consul")
    );

    // The manifest wins over the environment.
    let text = "consul:\n  address: http://10.0.0.5:8500\n  token: from-manifest\nservices:\n  - name: hello\n    port: 1\n";
    let m = parse(text, "m.yaml", &e).expect("valid");
    assert_eq!(m.consul.address, "http://10.0.0.5:8500");
    assert_eq!(
        m.consul.token.as_ref().map(Secret::expose),
        Some("from-manifest")
    );
    assert!(
        !format!("{m:?}").contains("from-manifest"),
        "token leaked into Debug"
    );
}

#[test]
fn consul_addresses_are_normalized_or_refused() {
    assert_eq!(
        normalize_consul_address("127.0.0.1:8500", false).as_deref(),
        Ok("http://127.0.0.1:8500")
    );
    assert_eq!(
        normalize_consul_address("http://consul", false).as_deref(),
        Ok("http://consul:8500")
    );
    assert_eq!(
        normalize_consul_address("https://consul", false).as_deref(),
        Ok("https://consul:8501")
    );
    assert_eq!(
        normalize_consul_address("http://consul:80/", false).as_deref(),
        Ok("http://consul:80")
    );
    assert_eq!(
        normalize_consul_address("[::1]:8500", false).as_deref(),
        Ok("http://[::1]:8500")
    );
    assert!(normalize_consul_address("unix:///var/run/consul.sock", false).is_err());
    assert!(normalize_consul_address("ftp://x:1", false).is_err());
    let errs = errors(
        "consul:\n  address: unix:///x\nservices:\n  - name: a\n    port: 1\n",
        &env(&[]),
    );
    assert!(
        errs[0].starts_with(
            "m.yaml:2:12: consul.address: \"unix:///x\": unix sockets are not supported"
        ),
        "{errs:?}"
    );
}

#[test]
fn a_missing_token_file_is_an_error_with_its_place() {
    let text = "consul:\n  tokenFile: /nonexistent/token\nservices:\n  - name: a\n    port: 1\n";
    let errs = errors(text, &env(&[]));
    assert!(
        errs[0].starts_with(
            "m.yaml:2:14: consul.tokenFile: cannot read token file /nonexistent/token"
        ),
        "{errs:?}"
    );
    let errs = errors(
        MINIMAL,
        &env(&[("CONSUL_HTTP_TOKEN_FILE", "/nonexistent/t")]),
    );
    assert!(
        errs[0].starts_with("m.yaml: $CONSUL_HTTP_TOKEN_FILE: cannot read token file"),
        "{errs:?}"
    );
}

#[test]
fn consul_tls_settings_next_to_a_plain_http_address_are_refused() {
    let text = "consul:\n  address: http://127.0.0.1:8500\n  tls:\n    serverName: consul.local\nservices:\n  - name: hello\n    port: 1\n";
    let errs = errors(text, &env(&[]));
    assert!(
        errs[0].contains("consul.tls: the Consul address http://127.0.0.1:8500 is plain HTTP"),
        "{errs:?}"
    );
    let errs = errors(
        MINIMAL,
        &env(&[
            ("CONSUL_HTTP_ADDR", "http://10.0.0.5:8500"),
            ("CONSUL_CACERT", "/ca.pem"),
        ]),
    );
    assert!(
        errs.iter().any(|e| e.starts_with(
            "m.yaml: $CONSUL_CACERT: the Consul address http://10.0.0.5:8500 is plain HTTP"
        )),
        "{errs:?}"
    );
}

#[test]
fn long_meta_values_and_path_segment_ids_are_refused() {
    let long = format!(
        "services:\n  - name: hello\n    port: 1\n    meta:\n      note: {}\n",
        "x".repeat(513)
    );
    assert!(errors(&long, &env(&[]))[0].contains("has 513 bytes; Consul allows at most 512"));
    let ok = format!(
        "services:\n  - name: hello\n    port: 1\n    meta:\n      note: {}\n",
        "x".repeat(512)
    );
    assert!(parse(&ok, "m.yaml", &env(&[])).is_ok());
    for id in [".", ".."] {
        let text = format!("services:\n  - name: hello\n    id: \"{id}\"\n    port: 1\n");
        assert!(
            errors(&text, &env(&[]))[0].contains("URL path segment"),
            "{id}"
        );
    }
}

#[test]
fn a_shared_sessions_advertise_address_is_an_ip_and_port_from_the_pod_ip() {
    let text = |advertise: &str| {
        format!(
            "consul:\n  mode: catalog\n  catalog:\n    node: n\n    nodeAddress: 10.0.0.1\n    sharedSession:\n      advertise: \"{advertise}\"\nservices:\n  - name: hello\n    port: 50051\n"
        )
    };
    let advertised = |advertise: &str, pod_ip: &str| {
        let m = parse(&text(advertise), "m.yaml", &env(&[("POD_IP", pod_ip)])).expect("valid");
        match m.consul.mode {
            ConsulMode::Catalog(c) => c.shared_session,
            ConsulMode::Agent => None,
        }
    };
    assert_eq!(
        advertised("${POD_IP}:9102", "10.1.2.3").as_deref(),
        Some("10.1.2.3:9102")
    );
    // An IPv6 pod's POD_IP comes without brackets; the URL needs them.
    assert_eq!(
        advertised("${POD_IP}:9102", "fd00:10:244::5").as_deref(),
        Some("[fd00:10:244::5]:9102")
    );
    for bad in ["${POD_IP}", "pod.example:9102", "10.0.0.1:port", ""] {
        let found = errors(&text(bad), &env(&[("POD_IP", "10.1.2.3")]));
        assert!(
            found
                .iter()
                .any(|e| e.contains("consul.catalog.sharedSession.advertise")
                    && e.contains("IP:port")),
            "{bad}: {found:?}"
        );
    }
}

#[test]
fn catalog_mode_names_its_node_after_the_kubernetes_node() {
    let text = "consul:\n  mode: catalog\nservices:\n  - name: hello\n    port: 50051\n";
    let m = parse(
        text,
        "m.yaml",
        &env(&[("NODE_NAME", "node-a"), ("HOST_IP", "10.0.0.7")]),
    )
    .expect("valid");
    assert_eq!(
        m.consul.mode,
        ConsulMode::Catalog(CatalogSettings {
            node: "consul-registrar-node-a".into(),
            node_address: "10.0.0.7".into(),
            session_ttl: Duration::from_secs(10),
            key_prefix: "consul-registrar/instances".into(),
            shared_session: None,
        })
    );
    let explicit = "consul:\n  mode: catalog\n  catalog:\n    node: edge-1\n    nodeAddress: 10.0.0.8\n    sessionTTL: 30s\n    keyPrefix: team/live/\nservices:\n  - name: hello\n    port: 50051\n";
    let ConsulMode::Catalog(c) = parse(explicit, "m.yaml", &env(&[]))
        .expect("valid")
        .consul
        .mode
    else {
        panic!("catalog mode expected");
    };
    assert_eq!(
        (
            c.node.as_str(),
            c.node_address.as_str(),
            c.key_prefix.as_str()
        ),
        ("edge-1", "10.0.0.8", "team/live")
    );
    assert_eq!(c.session_ttl, Duration::from_secs(30));
    assert_eq!(
        parse(MINIMAL, "m.yaml", &env(&[]))
            .expect("valid")
            .consul
            .mode,
        ConsulMode::Agent
    );
}

#[test]
fn catalog_mode_without_a_node_or_with_agent_fields_is_refused_where_it_is_written() {
    let text = "consul:\n  mode: catalog\nservices:\n  - name: hello\n    port: 50051\n    check:\n      ttl: 15s\n";
    let errs = errors(text, &env(&[]));
    assert!(
        errs.iter()
            .any(|e| e.starts_with("m.yaml:2:3: consul.catalog.node: catalog mode needs a node")),
        "{errs:?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.contains("consul.catalog.nodeAddress") && e.contains("HOST_IP")),
        "{errs:?}"
    );
    assert!(
        errs.iter().any(|e| e
            .starts_with("m.yaml:7:12: services[0].check.ttl: check.ttl belongs to agent mode")),
        "{errs:?}"
    );
    let agent = "consul:\n  catalog:\n    node: x\nservices:\n  - name: hello\n    port: 50051\n";
    let errs = errors(agent, &env(&[]));
    assert!(
        errs.iter().any(|e| e.contains(
            "consul.catalog: consul.catalog configures catalog mode, but consul.mode is agent"
        )),
        "{errs:?}"
    );
    let bad = "consul:\n  mode: registry\n  catalog:\n    sessionTTL: 5s\nservices:\n  - name: hello\n    port: 50051\n";
    let errs = errors(bad, &env(&[]));
    assert!(
        errs.iter()
            .any(|e| e.contains("consul.mode") && e.contains("not a Consul mode")),
        "{errs:?}"
    );
    let short = "consul:\n  mode: catalog\n  catalog:\n    sessionTTL: 5s\n    keyPrefix: a//b\nservices:\n  - name: hello\n    port: 50051\n";
    let errs = errors(short, &env(&[("NODE_NAME", "n"), ("HOST_IP", "10.0.0.1")]));
    assert!(
        errs.iter().any(|e| e.contains("consul.catalog.keyPrefix")),
        "{errs:?}"
    );
    let ttl = "consul:\n  mode: catalog\n  catalog:\n    sessionTTL: 5s\nservices:\n  - name: hello\n    port: 50051\n";
    let errs = errors(ttl, &env(&[("NODE_NAME", "n"), ("HOST_IP", "10.0.0.1")]));
    assert!(
        errs.iter().any(|e| e.starts_with(
            "m.yaml:4:17: consul.catalog.sessionTTL: 5s is outside Consul's session TTL range"
        )),
        "{errs:?}"
    );
}

/// Every object property of the manifest's JSON Schema with its YAML path (`services[0].health`),
/// following `$ref`s from the root.
fn schema_properties(schema: &serde_json::Value) -> Vec<(String, serde_json::Value)> {
    fn resolve<'a>(
        root: &'a serde_json::Value,
        node: &'a serde_json::Value,
    ) -> &'a serde_json::Value {
        let target = node
            .get("$ref")
            .or_else(|| node.pointer("/allOf/0/$ref"))
            .or_else(|| node.pointer("/anyOf/0/$ref"))
            .and_then(|r| r.as_str());
        match target.and_then(|r| r.strip_prefix('#')) {
            Some(pointer) => root.pointer(pointer).unwrap_or(node),
            None => node,
        }
    }
    fn walk(
        root: &serde_json::Value,
        node: &serde_json::Value,
        path: &str,
        out: &mut Vec<(String, serde_json::Value)>,
    ) {
        let node = resolve(root, node);
        if let Some(items) = node.get("items") {
            walk(root, items, &format!("{path}[0]"), out);
        }
        let Some(properties) = node.get("properties").and_then(|p| p.as_object()) else {
            return;
        };
        for (name, property) in properties {
            let child = if path.is_empty() {
                name.clone()
            } else {
                format!("{path}.{name}")
            };
            out.push((child.clone(), property.clone()));
            walk(root, property, &child, out);
        }
    }
    let mut out = Vec::new();
    walk(schema, schema, "", &mut out);
    out
}

#[test]
fn every_field_of_the_schema_is_described() {
    let schema = schema::json_schema();
    let properties = schema_properties(&schema);
    assert!(
        properties.len() > 40,
        "walked only {} fields",
        properties.len()
    );
    for (path, property) in properties {
        let description = property["description"].as_str().unwrap_or_default();
        assert!(
            description.len() > 10,
            "{path} has no description in the schema: give its field in schema.rs a doc comment"
        );
    }
}

/// A minimal manifest with `value` set at `path` (`consul.retry.initial`, `services[0].port`).
fn manifest_with(path: &str, value: Option<&serde_json::Value>) -> String {
    let mut doc = serde_json::json!({
        "services": [{"name": "hello", "id": "hello-1", "address": "10.1.2.3", "port": 50051}]
    });
    if path.starts_with("consul.catalog.") {
        doc["consul"] = serde_json::json!({"mode": "catalog", "address": "http://consul:8500"});
    }
    if path.starts_with("consul.login.") {
        doc["consul"] = serde_json::json!({"login": {"authMethod": "consul-k8s-auth-method"}});
    }
    if path.starts_with("services[0].weights.") {
        doc["services"][0]["weights"] = serde_json::json!({"passing": 1});
    }
    if let Some(value) = value {
        let mut node = &mut doc;
        let segments: Vec<&str> = path.split('.').collect();
        for (i, segment) in segments.iter().enumerate() {
            let (key, index) = match segment.strip_suffix("[0]") {
                Some(key) => (key, Some(0)),
                None => (*segment, None),
            };
            if i + 1 == segments.len() {
                node[key] = value.clone();
                break;
            }
            if node.get(key).is_none() {
                node[key] = serde_json::json!({});
            }
            node = &mut node[key];
            if let Some(index) = index {
                node = &mut node[index];
            }
        }
    }
    serde_json::to_string(&doc).expect("JSON is YAML")
}

#[test]
fn the_defaults_the_schema_documents_are_the_ones_the_parser_applies() {
    let e = env(&[("NODE_NAME", "node-a"), ("HOST_IP", "10.0.0.1")]);
    let schema = schema::json_schema();
    let mut checked = 0;
    for (path, property) in schema_properties(&schema) {
        let Some(default) = property.get("default") else {
            continue;
        };
        let resolved = |value| {
            let text = manifest_with(&path, value);
            match parse(&text, "m.yaml", &e) {
                Ok(m) => format!("{m:?}"),
                Err(errs) => panic!("{path}: {errs}\n{text}"),
            }
        };
        assert_eq!(
            resolved(Some(default)),
            resolved(None),
            "{path}: the schema documents the default {default}, the parser applies another"
        );
        checked += 1;
    }
    assert!(checked >= 15, "only {checked} documented defaults");
}

#[test]
fn a_wrong_documented_default_is_caught() {
    // The comparison above sees a difference that a field's default would make.
    let e = env(&[]);
    let with = parse(
        &manifest_with("drain.delay", Some(&serde_json::json!("6s"))),
        "m.yaml",
        &e,
    );
    let without = parse(&manifest_with("drain.delay", None), "m.yaml", &e);
    assert_ne!(
        format!("{:?}", with.expect("valid")),
        format!("{:?}", without.expect("valid"))
    );
    let with = parse(
        &manifest_with("consul.blockingWatches", Some(&serde_json::json!(7))),
        "m.yaml",
        &e,
    );
    let without = parse(&manifest_with("consul.blockingWatches", None), "m.yaml", &e);
    assert_ne!(
        format!("{:?}", with.expect("valid")),
        format!("{:?}", without.expect("valid"))
    );
}

#[test]
fn a_login_gets_the_kubernetes_defaults_and_ignores_the_token_variables() {
    let text = "consul:\n  login:\n    authMethod: consul-k8s-auth-method\n    meta:\n      pod: ${POD_NAME}\nservices:\n  - name: hello\n    port: 50051\n";
    let e = env(&[
        ("CONSUL_HTTP_TOKEN", "from-env"),
        ("CONSUL_HTTP_TOKEN_FILE", "/nonexistent/t"),
        ("POD_NAME", "hello-7d9f"),
    ]);
    let m = parse(text, "m.yaml", &e).expect("valid");
    assert_eq!(m.consul.token, None);
    assert_eq!(m.consul.token_file, None);
    let login = m.consul.login.expect("login");
    assert_eq!(login.auth_method, "consul-k8s-auth-method");
    assert_eq!(
        login.bearer_token_file,
        PathBuf::from(DEFAULT_BEARER_TOKEN_FILE)
    );
    assert_eq!(
        login.meta.get("pod").map(String::as_str),
        Some("hello-7d9f")
    );
}

#[test]
fn a_login_beside_a_token_is_a_located_error() {
    let text = "consul:\n  token: abc\n  login:\n    authMethod: m\nservices:\n  - name: hello\n    port: 50051\n";
    let errs = errors(text, &env(&[]));
    assert_eq!(
        errs,
        [
            "m.yaml:4:5: consul.login: set either login or token/tokenFile, not both: a login gets its own token from the auth method"
        ]
    );
}
