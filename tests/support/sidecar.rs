//! Runs the real `consul-registrar` binary as a child process for integration tests: writes the
//! manifest to a temp dir, picks a free admin port, captures the log, sends real signals.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A running sidecar. Dropping it kills the process; if the test is failing, its log is printed.
pub struct Sidecar {
    child: Option<Child>,
    pub admin: String,
    pub log_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Sidecar {
    /// Starts `consul-registrar run` with `manifest` (YAML text) and extra environment variables.
    pub fn start(manifest: &str, env: &[(&str, &str)]) -> Sidecar {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("manifest.yaml");
        std::fs::write(&path, manifest).expect("write manifest");
        let port = super::free_port();
        let admin = format!("127.0.0.1:{port}");
        let log_path = dir.path().join("sidecar.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        let mut cmd = Command::new(super::registrar_bin());
        cmd.args(["run", "--manifest"])
            .arg(&path)
            .args(["--admin-addr", &admin, "--log-level", "debug"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        for var in [
            "CONSUL_HTTP_ADDR",
            "CONSUL_HTTP_TOKEN",
            "CONSUL_HTTP_TOKEN_FILE",
            "CONSUL_CACERT",
            "POD_IP",
            "POD_NAME",
            "POD_NAMESPACE",
        ] {
            cmd.env_remove(var);
        }
        cmd.envs(env.iter().copied());
        let child = cmd.spawn().expect("spawn consul-registrar");
        Sidecar {
            child: Some(child),
            admin,
            log_path,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends a signal by name (`TERM`, `INT`, `KILL`, `STOP`, ...).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The log so far.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log_path) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// GET on the admin server: (status, body).
    pub async fn get(&self, path: &str) -> (u16, String) {
        self.request(reqwest::Method::GET, path).await
    }

    pub async fn request(&self, method: reqwest::Method, path: &str) -> (u16, String) {
        let client = super::http_client();
        match client
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
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("----- consul-registrar log -----\n{}\n-----", self.logs());
        }
    }
}
