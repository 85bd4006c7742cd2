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
