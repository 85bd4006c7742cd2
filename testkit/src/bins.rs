//! Where the binaries under test are. Nothing here runs cargo: `make unit-and-integration` and
//! `make podsim` build the sidecar and the demo app once, before the tests (`cargo build --bins
//! --workspace`), and pass their paths in `CONSUL_REGISTRAR_BIN` and `DEMO_APP_BIN`. Without those
//! variables the binaries are looked up in the target directory the running test (or the benchmark)
//! was built into, where `cargo build --bins --workspace` puts them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::SystemTime;

/// The repository root (the workspace).
pub fn workspace_root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The output of one of the repository's scripts that print a path (`consul.sh`, `go-peers.sh`),
/// or a panic with its explanation.
fn script_path(script: &str, what: &str) -> PathBuf {
    let path = workspace_root().join("scripts").join(script);
    let out = Command::new("bash")
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", path.display()));
    assert!(
        out.status.success(),
        "{what}: scripts/{script} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

static CONSUL: OnceLock<PathBuf> = OnceLock::new();
static REGISTRAR: OnceLock<PathBuf> = OnceLock::new();
static DEMO_APP: OnceLock<PathBuf> = OnceLock::new();

/// Makes every Consul agent, sidecar and demo app of this process use these binaries (the
/// benchmark's release builds). Must come before the first use; false if one was already chosen.
pub fn use_binaries(consul: PathBuf, registrar: PathBuf, demo_app: PathBuf) -> bool {
    CONSUL.set(consul).is_ok() & REGISTRAR.set(registrar).is_ok() & DEMO_APP.set(demo_app).is_ok()
}

/// The `consul` binary from `scripts/consul.sh` (which honours `CONSUL_BIN`), once per process.
/// Panics, never skips, with the script's explanation of how to provide Consul.
pub fn consul_bin() -> PathBuf {
    CONSUL.get_or_init(|| {
        script_path(
            "consul.sh",
            "no Consul binary for the tests (set CONSUL_BIN to a consul 1.20+ binary, or install Go so that scripts/consul.sh can build it)",
        )
    })
    .clone()
}

/// The directory holding the Go peers (`hello-server`, `hello-client`), built once by
/// `scripts/go-peers.sh` (cached per source hash).
pub fn go_peers() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| script_path("go-peers.sh", "building the Go peers failed"))
        .clone()
}

/// The profile directory (`<target>/debug`, `<target>/release`) the running executable was built
/// into: its parent, or its grandparent for tests (`deps/`) and examples (`examples/`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let dir = exe.parent().expect("the test's directory");
    match dir.file_name().and_then(|n| n.to_str()) {
        Some("deps" | "examples") => dir.parent().unwrap_or(dir).to_path_buf(),
        _ => dir.to_path_buf(),
    }
}

/// The binary `name`: the path in `var` if set, else `<profile dir>/<name>`. Panics when it is
/// missing, or older than a file under `sources` (a stale binary would test old code), saying how
/// to build it.
fn binary(var: &str, name: &str, sources: &[&str]) -> PathBuf {
    let from_env = std::env::var_os(var).filter(|v| !v.is_empty());
    let bin = from_env
        .clone()
        .map_or_else(|| profile_dir().join(name), PathBuf::from);
    let build = format!(
        "build it first: `make unit-and-integration` and `make podsim` do (`cargo build --locked --bins --workspace`), or set {var}"
    );
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| {
            let under_ci = std::env::var("CI").is_ok_and(|v| v == "true");
            panic!(
                "no {name} binary at {}{}; {build}",
                bin.display(),
                if under_ci { " (CI=true)" } else { "" }
            )
        });
    if from_env.is_none()
        && let Some(newer) = sources
            .iter()
            .filter_map(|s| newest_under(&workspace_root().join(s)))
            .filter(|(t, _)| *t > built)
            .map(|(_, p)| p)
            .next()
    {
        panic!(
            "{} is older than {}: {build}",
            bin.display(),
            newer.display()
        );
    }
    bin
}

/// The most recently modified file under `path` (a file or a directory tree).
fn newest_under(path: &Path) -> Option<(SystemTime, PathBuf)> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.is_file() {
        return Some((meta.modified().ok()?, path.to_path_buf()));
    }
    std::fs::read_dir(path)
        .ok()?
        .flatten()
        .filter_map(|e| newest_under(&e.path()))
        .max_by_key(|(t, _)| *t)
}

/// The sidecar binary under test (`CONSUL_REGISTRAR_BIN`, else beside the test executable; cargo
/// builds it before the sidecar crate's own integration tests).
pub fn registrar_bin() -> PathBuf {
    REGISTRAR
        .get_or_init(|| binary("CONSUL_REGISTRAR_BIN", "consul-registrar", &[]))
        .clone()
}

/// The demo app binary (`DEMO_APP_BIN`, else `<target>/<profile>/demo-app` beside the test
/// executable, checked to be newer than the demo app's sources).
pub fn demo_app_bin() -> PathBuf {
    DEMO_APP
        .get_or_init(|| {
            binary(
                "DEMO_APP_BIN",
                "demo-app",
                &["demo-app/src", "demo-app/proto"],
            )
        })
        .clone()
}
