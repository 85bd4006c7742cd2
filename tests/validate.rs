//! `consul-registrar validate` on the catalogue of broken manifests in `tests/manifests/`: each
//! `<case>.yaml` must be refused with exit code 65 and the message in `<case>.expected` (a prefix of
//! the first error line, `file:line:column: field: problem`). The valid example must pass and print
//! the registrations it would send.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn registrar() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_consul-registrar"));
    for var in testkit::CONSUL_ENV
        .into_iter()
        .chain(["CONSUL_REGISTRAR_TEST_UNSET_VAR"])
    {
        cmd.env_remove(var);
    }
    cmd
}

fn catalogue() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/manifests")
}

fn validate(dir: &Path, file: &str) -> Output {
    registrar()
        .current_dir(dir)
        .args(["validate", "--manifest", file])
        .output()
        .expect("run consul-registrar")
}

#[test]
fn every_broken_manifest_gets_its_documented_error() {
    let dir = catalogue();
    let mut cases: Vec<_> = std::fs::read_dir(&dir)
        .expect("tests/manifests exists")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    cases.sort();
    assert!(
        cases.len() >= 20,
        "the catalogue shrank: {} cases",
        cases.len()
    );
    let mut failures = Vec::new();
    for case in &cases {
        let file = case
            .file_name()
            .and_then(|f| f.to_str())
            .expect("utf-8 name");
        let expected = std::fs::read_to_string(case.with_extension("expected"))
            .unwrap_or_else(|_| panic!("{file} has no .expected file"));
        let expected = expected.trim_end();
        let out = validate(&dir, file);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let first = stderr.lines().next().unwrap_or_default();
        if out.status.code() != Some(65) || !first.starts_with(expected) || !out.stdout.is_empty() {
            failures.push(format!(
                "{file}: exit {:?}\n   got: {first}\n  want: {expected}\n stdout: {}",
                out.status.code(),
                String::from_utf8_lossy(&out.stdout)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_example_manifest_is_valid_and_prints_registrations() {
    let out = validate(
        Path::new(env!("CARGO_MANIFEST_DIR")),
        "examples/manifest.yaml",
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let regs: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(regs[0]["Name"], "hello");
    assert_eq!(regs[0]["ID"], "hello-1");
    assert_eq!(regs[0]["Checks"][0]["CheckID"], "consul-registrar:hello-1");
    assert_eq!(regs[0]["Checks"][0]["Status"], "critical");
    assert_eq!(regs[0]["Meta"]["managed-by"], "consul-registrar");
}

#[test]
fn an_unreadable_manifest_exits_66_and_names_the_file() {
    let out = validate(&catalogue(), "does-not-exist.yaml");
    assert_eq!(out.status.code(), Some(66));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("does-not-exist.yaml: cannot read the manifest"),
        "{stderr}"
    );
}

#[test]
fn environment_fills_the_downward_api_fields() {
    let out = registrar()
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("POD_NAME", "hello-7d9f")
        .env("POD_NAMESPACE", "shop")
        .env("POD_IP", "10.1.2.3")
        .args([
            "validate",
            "--manifest",
            "tests/manifests/downward-api.yaml.txt",
        ])
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let regs: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(regs[0]["ID"], "hello.shop.hello-7d9f");
    assert_eq!(regs[0]["Address"], "10.1.2.3");
    assert_eq!(regs[0]["Meta"]["pod-name"], "hello-7d9f");
    assert_eq!(regs[0]["Meta"]["pod-namespace"], "shop");
}
