//! The README's demo command tells the whole story: passing, critical, passing, and after the stop
//! signal critical ("draining"), then gone, with the sidecar exiting 0.

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
}
