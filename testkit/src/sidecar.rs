//! Runs the real `consul-registrar` binary as a child process: writes the manifest to a directory,
//! picks a free admin port, captures the log, sends real signals.

use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use crate::{Metrics, Proc, free_port, http_client, registrar_bin, signal_pid};

/// Runs `consul-registrar probe ARGS` once: its exit code and its stdout and stderr together.
pub fn probe(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(registrar_bin())
        .arg("probe")
        .args(args)
        .output()
        .expect("run consul-registrar probe");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// The environment variables the sidecar reads (the CONSUL_* set and the pod's downward API);
/// cleared for every sidecar a test starts, so that the test's own environment cannot leak in.
pub const CONSUL_ENV: [&str; 17] = [
    "CONSUL_HTTP_ADDR",
    "CONSUL_HTTP_TOKEN",
    "CONSUL_HTTP_TOKEN_FILE",
    "CONSUL_HTTP_SSL",
    "CONSUL_CACERT",
    "CONSUL_CLIENT_CERT",
    "CONSUL_CLIENT_KEY",
    "CONSUL_TLS_SERVER_NAME",
    "CONSUL_HTTP_SSL_VERIFY",
    "CONSUL_NAMESPACE",
    "CONSUL_PARTITION",
    "POD_IP",
    "POD_NAME",
    "POD_NAMESPACE",
    "POD_UID",
    "NODE_NAME",
    "HOST_IP",
];

/// How to start a sidecar beyond its manifest and environment. The default: `--log-level debug`,
/// files in a temporary directory.
#[derive(Debug, Clone)]
pub struct SidecarOptions {
    /// `--log-level`.
    pub log_level: &'static str,
    /// Where the manifest (`<name>.manifest.yaml`) and the log (`<name>.log`, appended to) go;
    /// default: `manifest.yaml` and `sidecar.log` in a temporary directory.
    pub files: Option<(PathBuf, String)>,
}

impl Default for SidecarOptions {
    fn default() -> Self {
        SidecarOptions {
            log_level: "debug",
            files: None,
        }
    }
}

/// A running sidecar. Dropping it kills the process; if the test is failing, its log is printed.
pub struct Sidecar {
    proc: Proc,
    /// The admin server's address, `127.0.0.1:PORT`.
    pub admin: String,
    /// The file that receives its stdout and stderr.
    pub log_path: PathBuf,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Sidecar {
    /// Starts `consul-registrar run` with `manifest` (YAML text) and extra environment variables.
    pub fn start(manifest: &str, env: &[(&str, &str)]) -> Sidecar {
        Self::start_with(manifest, env, &SidecarOptions::default())
    }

    /// [`start`](Self::start) with options.
    pub fn start_with(manifest: &str, env: &[(&str, &str)], opts: &SidecarOptions) -> Sidecar {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, log_path) = match &opts.files {
            Some((d, name)) => (
                d.join(format!("{name}.manifest.yaml")),
                d.join(format!("{name}.log")),
            ),
            None => (
                dir.path().join("manifest.yaml"),
                dir.path().join("sidecar.log"),
            ),
        };
        std::fs::write(&path, manifest).expect("write manifest");
        let admin = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new(registrar_bin());
        cmd.args(["run", "--manifest"]).arg(&path).args([
            "--admin-addr",
            &admin,
            "--log-level",
            opts.log_level,
        ]);
        for var in CONSUL_ENV {
            cmd.env_remove(var);
        }
        cmd.envs(env.iter().copied());
        // Also where a manifest can read it: `${CONSUL_REGISTRAR_ADMIN_ADDR}` (a shared session's
        // `advertise`, which must name this sidecar's admin server).
        cmd.env("CONSUL_REGISTRAR_ADMIN_ADDR", &admin);
        Sidecar {
            proc: Proc::spawn(cmd, log_path.clone()),
            admin,
            log_path,
            http: http_client(),
            _dir: dir,
        }
    }

    /// The process id (0 once it has exited).
    pub fn pid(&self) -> u32 {
        self.proc.pid().unwrap_or(0)
    }

    /// Sends a signal by name (`TERM`, `INT`, `KILL`, `STOP`, ...).
    pub fn signal(&self, name: &str) {
        if let Err(e) = signal_pid(self.pid(), name) {
            panic!("kill -{name} failed: {e}");
        }
    }

    /// Waits (blocking) up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.proc.exited() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits asynchronously (polling every 2 ms) up to `timeout` for the process to exit.
    pub async fn exit_within(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.proc.wait_exit(timeout).await
    }

    /// SIGTERM (the drain), then waits up to `timeout` for the exit.
    pub async fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.proc.signal("TERM");
        self.exit_within(timeout).await
    }

    /// The log so far.
    pub fn logs(&self) -> String {
        self.proc.own_logs()
    }

    /// The last `lines` lines of the log.
    pub fn tail(&self, lines: usize) -> String {
        self.proc.tail(lines)
    }

    /// GET on the admin server: (status, body).
    pub async fn get(&self, path: &str) -> (u16, String) {
        self.request(reqwest::Method::GET, path).await
    }

    /// A request on the admin server: (status, body), or (0, the error).
    pub async fn request(&self, method: reqwest::Method, path: &str) -> (u16, String) {
        match self
            .http
            .request(method, format!("http://{}{path}", self.admin))
            .timeout(Duration::from_secs(30))
            .send()
            .await
        {
            Ok(r) => {
                let status = r.status().as_u16();
                (status, r.text().await.unwrap_or_default())
            }
            Err(e) => (0, e.to_string()),
        }
    }

    /// The value of one metric series (the sample line starting with `series`), if present.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics").await;
        body.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// Every sample of `/metrics`, parsed (empty when the admin server does not answer).
    pub async fn metrics(&self) -> Metrics {
        match self.get("/metrics").await {
            (200, body) => Metrics::parse(&body),
            _ => Metrics::parse(""),
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.proc.kill();
        if std::thread::panicking() {
            eprintln!("----- consul-registrar log -----\n{}\n-----", self.logs());
        }
    }
}
