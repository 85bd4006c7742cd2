//! `consul-registrar probe` promises grpc_health_probe's exit codes. This runs the real
//! grpc_health_probe (v0.4.62, built by scripts/grpc-health-probe.sh; the Makefile passes it in
//! GRPC_HEALTH_PROBE) and `probe` side by side on the same real targets and asserts identical exit
//! codes, printing the table.

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use support::{ConsulAgent, ConsulOptions, DemoApp, DemoAppOptions};

/// The real grpc_health_probe: $GRPC_HEALTH_PROBE, else what scripts/grpc-health-probe.sh provides
/// (it builds it once with Go). None when neither works, which fails the test under CI=true.
fn grpc_health_probe() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("GRPC_HEALTH_PROBE").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/grpc-health-probe.sh");
    let out = Command::new("bash").arg(script).output().expect("run bash");
    if out.status.success() {
        return Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    }
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true and no grpc_health_probe (set GRPC_HEALTH_PROBE or install Go):\n{why}"
    );
    None
}

/// A server that accepts connections and never says anything.
fn silent_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming().flatten() {
            held.push(conn);
        }
    });
    addr
}

/// A real HTTP/1 server (hyper's, as in the sidecar's admin port) answering 200 to everything.
fn http1_server(rt: &tokio::runtime::Handle) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr").to_string();
    rt.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(hyper::body::Bytes::from_static(b"hello\n")),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    addr
}

/// An HTTP/2 server that sends its SETTINGS (so the client counts it as connected), reads frames
/// until the first HEADERS (the RPC), and then resets the connection: closing a socket with unread
/// data (the rest of the RPC) makes Linux send RST.
fn reset_mid_rpc_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || reset_at_first_headers(conn));
        }
    });
    addr
}

fn reset_at_first_headers(mut conn: TcpStream) {
    const SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];
    const SETTINGS_ACK: [u8; 9] = [0, 0, 0, 4, 1, 0, 0, 0, 0];
    let mut preface = [0u8; 24];
    if conn.write_all(&SETTINGS).is_err() || conn.read_exact(&mut preface).is_err() {
        return;
    }
    loop {
        let mut header = [0u8; 9];
        if conn.read_exact(&mut header).is_err() {
            return;
        }
        let (length, kind, flags) = (
            u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize,
            header[3],
            header[4],
        );
        if kind == 1 {
            // HEADERS: leave its payload (and the request's DATA) unread, then close → RST.
            std::thread::sleep(Duration::from_millis(50));
            return;
        }
        let mut payload = vec![0u8; length];
        if conn.read_exact(&mut payload).is_err() {
            return;
        }
        if kind == 4 && flags & 1 == 0 && conn.write_all(&SETTINGS_ACK).is_err() {
            return;
        }
    }
}

/// Runs both probes with the same arguments at the same time; their exit codes and output.
fn run_both(ghp: &PathBuf, args: &[String]) -> (Output, Output) {
    let theirs = Command::new(ghp)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let ours = Command::new(support::registrar_bin())
        .arg("probe")
        .args(args)
        .output()
        .expect("run consul-registrar probe");
    let theirs = theirs
        .and_then(|c| c.wait_with_output())
        .expect("run grpc_health_probe");
    (theirs, ours)
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
    .trim()
    .replace('\n', " | ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_exit_codes_equal_the_real_grpc_health_probe_on_every_target() {
    let Some(ghp) = grpc_health_probe() else {
        eprintln!(
            "SKIPPED: no grpc_health_probe (set GRPC_HEALTH_PROBE, or install Go for scripts/grpc-health-probe.sh)"
        );
        return;
    };
    // Certificates from `consul tls` (the agent is never started): a CA, a server certificate
    // for 127.0.0.1 signed by it, and a second CA that did not sign it.
    let certs = ConsulAgent::prepare(ConsulOptions {
        tls: true,
        ..ConsulOptions::default()
    });
    let serving = DemoApp::start(DemoAppOptions::default()).await;
    let not_serving = DemoApp::start(DemoAppOptions {
        start_serving: false,
        ..DemoAppOptions::default()
    })
    .await;
    let tls_app = DemoApp::start(DemoAppOptions {
        tls: certs.server_cert(),
        ..DemoAppOptions::default()
    })
    .await;
    let path = |p: Option<PathBuf>| p.expect("TLS files").display().to_string();
    let nothing_listening = format!("127.0.0.1:{}", support::free_port());
    let http1 = http1_server(&tokio::runtime::Handle::current());
    let silent = silent_server();
    let reset = reset_mid_rpc_server();

    let tls = |ca: String| vec!["--tls".to_string(), "--tls-ca-cert".to_string(), ca];
    let rows: Vec<(&str, String, Vec<String>, i32)> = vec![
        ("serving", serving.addr(), vec![], 0),
        (
            "serving, named service",
            serving.addr(),
            vec!["--service".into(), "helloworld.Greeter".into()],
            0,
        ),
        ("not serving", not_serving.addr(), vec![], 4),
        (
            "unknown service",
            serving.addr(),
            vec!["--service".into(), "no.such.Service".into()],
            3,
        ),
        ("nothing listening", nothing_listening, vec![], 2),
        ("HTTP/1 server", http1, vec![], 2),
        ("accepts, never answers", silent, vec![], 2),
        (
            "TLS, right CA",
            tls_app.addr(),
            tls(path(certs.ca_file())),
            0,
        ),
        (
            "TLS, wrong CA",
            tls_app.addr(),
            tls(path(certs.wrong_ca_file())),
            2,
        ),
        ("reset mid-RPC", reset, vec![], 3),
    ];

    let mut table = vec![format!(
        "{:<24} {:>17} {:>22} {:>9}",
        "target", "grpc_health_probe", "consul-registrar probe", "expected"
    )];
    let mut differences = Vec::new();
    for (name, addr, extra, expected) in &rows {
        let mut args = vec![
            "--addr".to_string(),
            addr.clone(),
            "--connect-timeout".into(),
            "1s".into(),
            "--rpc-timeout".into(),
            "1s".into(),
        ];
        args.extend(extra.iter().cloned());
        let (theirs, ours) = tokio::task::block_in_place(|| run_both(&ghp, &args));
        let (t, o) = (theirs.status.code(), ours.status.code());
        table.push(format!(
            "{name:<24} {:>17} {:>22} {expected:>9}",
            format!("{t:?}"),
            format!("{o:?}")
        ));
        if t != o || t != Some(*expected) {
            differences.push(format!(
                "{name} ({args:?}): grpc_health_probe {t:?} [{}], probe {o:?} [{}], expected {expected}",
                text(&theirs),
                text(&ours)
            ));
        }
    }
    let table = table.join("\n");
    println!("{table}");
    assert!(
        differences.is_empty(),
        "exit codes differ:\n{table}\n\n{}",
        differences.join("\n")
    );
}
