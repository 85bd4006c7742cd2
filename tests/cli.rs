//! The command line as users and Kubernetes see it: `probe` with grpc_health_probe's exit codes,
//! `--version`, JSON logs, colour only on a terminal without NO_COLOR, and a shutdown that cannot
//! reach Consul ending with a clear error; `schema` printing the committed manifest schema.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::sidecar::{Sidecar, probe};
use support::{ConsulAgent, DemoApp, DemoAppOptions, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_exit_codes_match_grpc_health_probe() {
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let addr = app.addr();
    let (code, text) = probe(&["--addr", &addr, "--service", "helloworld.Greeter"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("SERVING"));

    app.set_serving(false).await;
    let (code, text) = probe(&["--addr", &addr]);
    assert_eq!(code, Some(4), "{text}");
    assert!(text.contains("NOT_SERVING"), "{text}");

    let (code, text) = probe(&["--addr", &addr, "--service", "no.such.Service"]);
    assert_eq!(
        code,
        Some(3),
        "an unknown service is an RPC error (NOT_FOUND): {text}"
    );

    let closed = format!("127.0.0.1:{}", support::free_port());
    let (code, text) = probe(&["--addr", &closed, "--timeout", "300ms"]);
    assert_eq!(code, Some(2), "{text}");

    let (code, _) = probe(&["--addr"]);
    assert_eq!(code, Some(1), "bad arguments");
    let (code, _) = probe(&["--addr", "no-port"]);
    assert_eq!(code, Some(1), "bad address");

    // A hung app: the RPC times out.
    app.signal("STOP");
    let (code, text) = probe(&[
        "--addr",
        &addr,
        "--rpc-timeout",
        "300ms",
        "--connect-timeout",
        "300ms",
    ]);
    app.signal("CONT");
    assert!(
        matches!(code, Some(2) | Some(3)),
        "a stopped app must not look healthy: {code:?} {text}"
    );
}

#[test]
fn version_and_usage() {
    let out = Command::new(support::registrar_bin())
        .arg("--version")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("consul-registrar {}", env!("CARGO_PKG_VERSION"))
    );
    let out = Command::new(support::registrar_bin())
        .arg("frobnicate")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");
}

/// `consul-registrar schema` prints exactly the committed docs/manifest.schema.json, which editors,
/// the chart's values schema and docs/manifest.md are made from: a field added in schema.rs fails
/// here until `make schema` has written them again.
#[test]
fn schema_prints_the_committed_manifest_schema() {
    let out = Command::new(support::registrar_bin())
        .arg("schema")
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("schema is JSON");
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/manifest.schema.json");
    let committed: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}")),
    )
    .unwrap_or_else(|e| panic!("{path}: {e}"));
    assert!(
        printed == committed,
        "docs/manifest.schema.json is not what `consul-registrar schema` prints: run `make schema` \
         (it also updates docs/manifest.md and the chart's values.schema.json) and commit the result"
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim_end(),
        std::fs::read_to_string(path).expect("read").trim_end(),
        "same schema, other formatting: run `make schema`"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_and_a_shutdown_without_consul_exits_non_zero_with_a_clear_line() {
    let mut consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let manifest = format!(
        "consul:\n  address: {}\n  retry: {{initial: 50ms, max: 200ms}}\ndrain:\n  delay: 0s\n  deregisterTimeout: 1s\nservices:\n  - name: hello\n    id: hello-1\n    address: 127.0.0.1\n    port: {}\n",
        consul.http_addr(),
        app.port()
    );
    let mut sidecar = Sidecar::start(&manifest, &[("CONSUL_REGISTRAR_LOG_FORMAT", "json")]);
    assert!(
        wait_until(Duration::from_secs(10), || async {
            consul.check_status("hello", "hello-1").await.as_deref() == Some("passing")
        })
        .await
    );
    consul.stop();

    let t0 = Instant::now();
    sidecar.signal("TERM");
    let status = sidecar
        .wait_exit(Duration::from_secs(10))
        .expect("exits after the deregistration deadline");
    let elapsed = t0.elapsed();
    assert_eq!(status.code(), Some(1), "{}", sidecar.logs());
    assert!(
        elapsed >= Duration::from_millis(500) && elapsed < Duration::from_secs(5),
        "deadline not honoured: {elapsed:?}"
    );
    let logs = sidecar.logs();
    let last_error = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["level"] == "ERROR")
        .map(|v| v["message"].as_str().unwrap_or_default().to_string())
        .next()
        .unwrap_or_else(|| panic!("no JSON error line in:\n{logs}"));
    assert!(
        last_error.contains(
            "could not deregister 1 instance(s) within drain.delay + drain.deregisterTimeout (1s)"
        ),
        "{last_error}"
    );
    assert!(
        last_error.contains("deregisterCriticalServiceAfter"),
        "the line names the safety net: {last_error}"
    );
}

/// `run` with the admin port taken: it logs one ERROR line and exits 1, without needing Consul.
fn failing_run(dir: &std::path::Path) -> (Command, std::net::TcpListener) {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let manifest = dir.join("manifest.yaml");
    std::fs::write(
        &manifest,
        "consul:\n  address: http://127.0.0.1:1\nservices:\n  - name: hello\n    id: hello-1\n    address: 127.0.0.1\n    port: 1\n",
    )
    .expect("write manifest");
    let mut cmd = Command::new(support::registrar_bin());
    cmd.arg("run")
        .arg("--manifest")
        .arg(&manifest)
        .arg("--admin-addr")
        .arg(taken.local_addr().expect("addr").to_string())
        .env_remove("NO_COLOR")
        .env_remove("CONSUL_REGISTRAR_LOG_FORMAT");
    (cmd, taken)
}

#[test]
fn logs_to_a_pipe_have_no_colour_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut cmd, _taken) = failing_run(dir.path());
    let out = cmd.output().expect("run");
    let logs = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{logs}");
    assert!(
        logs.contains("cannot listen on the admin address"),
        "{logs}"
    );
    assert_eq!(
        logs.matches("Address already in use").count(),
        1,
        "the cause is said once: {logs}"
    );
    assert!(
        !out.stderr.contains(&0x1b),
        "ANSI escape codes in logs written to a pipe: {logs:?}"
    );
}

/// Runs `cmd` with stdout and stderr on a pseudo-terminal (util-linux `script`); its output.
fn on_a_terminal(cmd: &Command, extra_env: &[(&str, &str)]) -> Option<Vec<u8>> {
    let quote = |s: &std::ffi::OsStr| format!("'{}'", s.to_string_lossy().replace('\'', r"'\''"));
    let line = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(quote)
        .collect::<Vec<_>>()
        .join(" ");
    let mut script = Command::new("script");
    script
        .args(["-qec", &line, "/dev/null"])
        .env_remove("NO_COLOR");
    script.envs(extra_env.iter().copied());
    match script.output() {
        Ok(out) => Some(out.stdout),
        Err(e) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true and no `script` (util-linux) to run on a terminal: {e}"
            );
            None
        }
    }
}

#[test]
fn logs_on_a_terminal_are_coloured_unless_no_color_is_set() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cmd, _taken) = failing_run(dir.path());
    let Some(coloured) = on_a_terminal(&cmd, &[]) else {
        eprintln!("SKIPPED: no `script` (util-linux) to give the binary a terminal");
        return;
    };
    let text = String::from_utf8_lossy(&coloured);
    assert!(
        text.contains("cannot listen on the admin address"),
        "{text}"
    );
    assert!(coloured.contains(&0x1b), "a terminal gets colour: {text:?}");
    let plain = on_a_terminal(&cmd, &[("NO_COLOR", "1")]).expect("script ran before");
    let text = String::from_utf8_lossy(&plain);
    assert!(
        text.contains("cannot listen on the admin address"),
        "{text}"
    );
    assert!(
        !plain.contains(&0x1b),
        "NO_COLOR=1 turns colour off even on a terminal: {text:?}"
    );
}
