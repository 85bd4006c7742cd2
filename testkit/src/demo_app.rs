//! The demo gRPC app (the `demo-app` binary of the `demo-app/` crate) on a free loopback port, with
//! its control port, flipped by HTTP or by signal.

use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use crate::{Proc, demo_app_bin, free_port, http_client, signal_pid, tail};

/// How to start the demo app. The default: serving, with Watch, health services "" and
/// `helloworld.Greeter`, plain gRPC.
#[derive(Debug, Clone)]
pub struct DemoAppOptions {
    /// Start SERVING (`--start serving`), else NOT_SERVING.
    pub start_serving: bool,
    /// Answer Watch with UNIMPLEMENTED (`--no-watch`).
    pub no_watch: bool,
    /// Named health services besides "" (`--health-service`, repeated).
    pub health_services: Vec<String>,
    /// Also serve health services `svc-0` … `svc-{N-1}` (`--generate-services`).
    pub generate_services: usize,
    /// The tag in SayHello replies (`--name`); the default is the listen address.
    pub name: Option<String>,
    /// Serve gRPC over TLS with this certificate and key (PEM files).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Append the app's output to this file (default `app.log` in a temporary directory).
    pub log: Option<PathBuf>,
    /// Open the gRPC port only this long after the start (`--start-delay`): an app still loading.
    /// [`DemoApp::start`] then returns at once, without waiting for the port.
    pub start_delay: Option<Duration>,
}

impl Default for DemoAppOptions {
    fn default() -> Self {
        DemoAppOptions {
            start_serving: true,
            no_watch: false,
            health_services: vec!["helloworld.Greeter".into()],
            generate_services: 0,
            name: None,
            tls: None,
            log: None,
            start_delay: None,
        }
    }
}

/// The demo app on a free loopback port, with a control port. Dropping it kills it; if the test
/// is failing, the end of its log is printed.
pub struct DemoApp {
    opts: DemoAppOptions,
    port: u16,
    control: u16,
    proc: Option<Proc>,
    dir: tempfile::TempDir,
    http: reqwest::Client,
}

impl DemoApp {
    /// Starts the app on a free loopback port, with a control port, and waits until it prints
    /// that it is listening.
    pub async fn start(opts: DemoAppOptions) -> DemoApp {
        let mut app = DemoApp {
            opts,
            port: free_port(),
            control: free_port(),
            proc: None,
            dir: tempfile::tempdir().expect("tempdir"),
            http: http_client(),
        };
        app.spawn().await;
        app
    }

    async fn spawn(&mut self) {
        let mut cmd = Command::new(demo_app_bin());
        cmd.args(["serve", "--listen", &format!("127.0.0.1:{}", self.port)])
            .args(["--control", &format!("127.0.0.1:{}", self.control)])
            .args([
                "--generate-services",
                &self.opts.generate_services.to_string(),
            ])
            .args([
                "--start",
                if self.opts.start_serving {
                    "serving"
                } else {
                    "not-serving"
                },
            ]);
        for s in &self.opts.health_services {
            cmd.args(["--health-service", s]);
        }
        if self.opts.no_watch {
            cmd.arg("--no-watch");
        }
        if let Some(name) = &self.opts.name {
            cmd.args(["--name", name]);
        }
        if let Some((cert, key)) = &self.opts.tls {
            cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
        }
        if let Some(delay) = self.opts.start_delay {
            cmd.args(["--start-delay", &format!("{}ms", delay.as_millis())]);
            self.proc = Some(Proc::spawn(cmd, self.log_path()));
            return;
        }
        self.proc = Some(Proc::spawn(cmd, self.log_path()));
        self.wait_listening(Duration::from_secs(20)).await;
    }

    /// Waits up to `timeout` until the app prints that it listens (its gRPC port is open).
    /// Panics if it exits or does not get there.
    pub async fn wait_listening(&mut self, timeout: Duration) {
        let proc = self.proc.as_mut().expect("demo-app is not running");
        let deadline = Instant::now() + timeout;
        while !proc.own_logs().contains("demo-app listening on") {
            if let Some(status) = proc.exited() {
                panic!(
                    "demo-app exited with {status} during start:\n{}",
                    proc.tail(20)
                );
            }
            assert!(
                Instant::now() < deadline,
                "demo-app did not listen within {timeout:?}:\n{}",
                proc.tail(20)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The gRPC port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The gRPC address, `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The HTTP control port (`POST /serving`, `POST /not-serving`, `GET /status`).
    pub fn control_port(&self) -> u16 {
        self.control
    }

    /// The file that receives the app's stdout and stderr.
    pub fn log_path(&self) -> PathBuf {
        self.opts
            .log
            .clone()
            .unwrap_or_else(|| self.dir.path().join("app.log"))
    }

    /// The process id (0 when not running).
    pub fn pid(&self) -> u32 {
        self.proc.as_ref().and_then(Proc::pid).unwrap_or(0)
    }

    /// Flips every health service through the control port.
    pub async fn set_serving(&self, serving: bool) {
        self.control_post(serving, None).await;
    }

    /// Flips one health service (`""` is the whole server) through the control port.
    pub async fn set_service_serving(&self, service: &str, serving: bool) {
        self.control_post(serving, Some(service)).await;
    }

    async fn control_post(&self, serving: bool, service: Option<&str>) {
        let path = if serving { "serving" } else { "not-serving" };
        let mut req = self
            .http
            .post(format!("http://127.0.0.1:{}/{path}", self.control))
            .timeout(Duration::from_secs(10));
        if let Some(service) = service {
            req = req.query(&[("service", service)]);
        }
        let r = req.send().await.expect("demo-app control port");
        assert!(
            r.status().is_success(),
            "control port answered {}",
            r.status()
        );
    }

    /// `GET /status` of the control port: health service name → `Serving` / `NotServing`.
    pub async fn status(&self) -> std::collections::BTreeMap<String, String> {
        self.http
            .get(format!("http://127.0.0.1:{}/status", self.control))
            .send()
            .await
            .expect("demo-app control port")
            .json()
            .await
            .expect("status JSON")
    }

    /// Sends a signal by name to the app (`USR1`, `USR2`, `STOP`, `CONT`, ...).
    pub fn signal(&self, name: &str) {
        if let Err(e) = signal_pid(self.pid(), name) {
            panic!("kill -{name} failed: {e}");
        }
    }

    /// Makes every health service NOT_SERVING with SIGUSR1, as an operator would from outside.
    pub fn signal_not_serving(&self) {
        self.signal("USR1");
    }

    /// Makes every health service SERVING with SIGUSR2.
    pub fn signal_serving(&self) {
        self.signal("USR2");
    }

    /// Sends SIGTERM and waits up to `timeout` for the app to exit: its exit status, or None if it
    /// is still running (it is then left running; drop kills it).
    pub async fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.signal("TERM");
        let status = self.proc.as_mut()?.wait_exit(timeout).await;
        if status.is_some() {
            self.proc = None;
        }
        status
    }

    /// Kills the app (SIGKILL).
    pub fn kill(&mut self) {
        self.proc = None;
    }

    /// The options the next [`restart`](Self::restart) uses (e.g. to come back NOT_SERVING).
    pub fn options_mut(&mut self) -> &mut DemoAppOptions {
        &mut self.opts
    }

    /// Starts it again on the same ports.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

impl Drop for DemoApp {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "----- demo-app log -----\n{}\n-----",
                tail(&self.log_path(), 40)
            );
        }
    }
}
