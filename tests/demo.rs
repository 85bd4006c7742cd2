//! The README's demo command (docs/getting-started.md) tells the whole story: passing, critical, passing, and after the stop
//! signal critical ("draining"), then gone, with the sidecar exiting 0. And it shows the speed it
//! exists to show: Consul has each flip within a second (issue 14's bound on a status line's lag).

mod support;

use std::process::Command;

#[test]
fn make_demo_shows_registration_follow_health_and_drain() {
    let port = || support::free_port().to_string();
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/demo.sh"))
        .env("DEMO_FLIPS", "2")
        .env("DEMO_FLIP_SECONDS", "1")
        .env("CONSUL_PORT", port())
        .env("APP_PORT", port())
        .env("CONTROL_PORT", port())
        .env("ADMIN_PORT", port())
        .env("CONSUL_BIN", support::consul_bin())
        // The binaries the tests run, so that the script starts no cargo build of its own.
        .env("CONSUL_REGISTRAR_BIN", support::registrar_bin())
        .env("DEMO_APP_BIN", support::demo_app_bin())
        .output()
        .expect("run scripts/demo.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let story: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("Consul: "))
        .collect();
    let expected = [
        "is PASSING",
        "is CRITICAL",
        "is PASSING",
        "is CRITICAL  (draining",
        "no instance of hello",
    ];
    assert_eq!(story.len(), expected.len(), "{stdout}");
    for (line, want) in story.iter().zip(expected) {
        assert!(
            line.contains(want),
            "expected {want:?} in {line:?}\n{stdout}"
        );
    }
    assert!(
        stdout.contains("consul-registrar exited with status 0"),
        "{stdout}"
    );
    assert!(
        stdout.contains("/ui/dc1/services/hello"),
        "the demo prints the Consul UI address"
    );
    assert!(
        !stdout.contains('\u{1b}'),
        "colour codes in the demo's output to a pipe (issue 14 item 7):\n{stdout}"
    );

    let lags = flip_lags(&stdout);
    assert_eq!(
        lags.len(),
        2,
        "one timed status line per flip (DEMO_FLIPS=2):\n{stdout}"
    );
    for (line, lag) in &lags {
        assert!(
            *lag <= 1.0,
            "Consul showed a flip {lag} s after it happened (more than 1 s): {line:?}\n{stdout}"
        );
    }
}

/// For each "flipping the app" header, the first following "hello-1 → STATUS in Consul after X s"
/// line and its X.
fn flip_lags(stdout: &str) -> Vec<(String, f64)> {
    let mut lags = Vec::new();
    let mut flipped = false;
    for line in stdout.lines() {
        if line.contains("flipping the app") {
            flipped = true;
        } else if let Some(rest) = line.split(" in Consul after ").nth(1)
            && std::mem::take(&mut flipped)
        {
            let seconds = rest.trim_end_matches(" s").trim();
            let lag = seconds
                .parse::<f64>()
                .unwrap_or_else(|e| panic!("{line:?}: {e}"));
            lags.push((line.to_string(), lag));
        }
    }
    lags
}
