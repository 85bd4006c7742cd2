//! Child processes of the harness: started with their output in a log file, signalled with
//! `kill(2)` (no `kill` process in between, so the moment the call returns is the moment the signal
//! was sent), killed when dropped.

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Sends the signal `name` (`TERM`, `INT`, `KILL`, `STOP`, `CONT`, `USR1`, `USR2`, `HUP`, `QUIT`;
/// a `SIG` prefix is allowed) to process `pid`. Panics on an unknown name or pid 0 (which would
/// signal the whole process group).
pub fn signal_pid(pid: u32, name: &str) -> io::Result<()> {
    let signal = match name.trim_start_matches("SIG") {
        "TERM" => libc::SIGTERM,
        "INT" => libc::SIGINT,
        "KILL" => libc::SIGKILL,
        "STOP" => libc::SIGSTOP,
        "CONT" => libc::SIGCONT,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "HUP" => libc::SIGHUP,
        "QUIT" => libc::SIGQUIT,
        other => panic!("unknown signal {other:?}"),
    };
    assert!(pid != 0, "no process to send SIG{name} to");
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::other("pid out of range"))?;
    // SAFETY: kill(2) takes two integers and touches no memory of ours.
    if unsafe { libc::kill(pid, signal) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A process with its log file. Dropping it kills the process (SIGKILL).
pub struct Proc {
    /// The process while it runs (None once it has exited and been reaped, or was killed).
    pub child: Option<Child>,
    /// The file its stdout and stderr are appended to.
    pub log: PathBuf,
    /// The length of the log when the process started: what came before is an earlier process's.
    log_start: u64,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Spawns `cmd` with stdin closed and stdout and stderr appended to `log`. Panics if it cannot.
    pub fn spawn(cmd: Command, log: PathBuf) -> Proc {
        let program = cmd.get_program().to_string_lossy().into_owned();
        Self::try_spawn(cmd, log).unwrap_or_else(|e| panic!("spawn {program}: {e}"))
    }

    /// [`spawn`](Self::spawn) that returns the error instead of panicking.
    pub fn try_spawn(mut cmd: Command, log: PathBuf) -> io::Result<Proc> {
        let file = File::options().create(true).append(true).open(&log)?;
        let log_start = file.metadata()?.len();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()?;
        Ok(Proc {
            child: Some(child),
            log,
            log_start,
            status: None,
        })
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends a signal by name (see [`signal_pid`]); nothing when the process is not running.
    pub fn signal(&self, name: &str) {
        if let Some(pid) = self.pid() {
            let _ = signal_pid(pid, name);
        }
    }

    /// The exit status if the process has exited (it is reaped then), else None.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            self.child = None;
            self.status = Some(status);
        }
        self.status.filter(|_| self.child.is_none())
    }

    /// Waits (blocking, polling every 10 ms) until `deadline` for the process to exit; its exit
    /// code, if it did.
    pub fn wait_until(&mut self, deadline: Instant) -> Option<Option<i32>> {
        self.child.as_ref()?;
        loop {
            if let Some(status) = self.exited() {
                return Some(status.code());
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits (asynchronously, polling every 2 ms, so that the moment it returns is within 2 ms of
    /// the exit) up to `timeout` for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            self.status = c.wait().ok();
        }
    }

    /// The whole log file.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// What this process has written to the log (not the earlier processes' lines).
    pub fn own_logs(&self) -> String {
        let bytes = std::fs::read(&self.log).unwrap_or_default();
        let start = usize::try_from(self.log_start)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        String::from_utf8_lossy(&bytes[start..]).into_owned()
    }

    /// The last `lines` lines of the log.
    pub fn tail(&self, lines: usize) -> String {
        crate::tail(&self.log, lines)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}
