//! The `consul-registrar` command: `run` (the sidecar), `validate` (check a manifest and print what
//! would be registered), `probe` (a one-shot gRPC health check, grpc_health_probe-compatible),
//! `schema` (print the manifest's JSON Schema).
//!
//! Exit codes: 0 success; 1 runtime failure (drain incomplete by drain.delay +
//! drain.deregisterTimeout, admin port taken, Consul client set-up); 2 command-line usage; 65
//! invalid manifest; 66 manifest unreadable; 78 a set-up that cannot work (calls to
//! consul.address reach different agents). `probe` uses
//! grpc_health_probe's codes instead: 0 serving, 1 bad arguments, 2 connection failure, 3 RPC
//! failure or timeout, 4 not serving.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use consul_registrar::consul::{AgentServiceRegistration, CheckStatus, catalog};
use consul_registrar::manifest::{self, ConsulMode, Environment, ManifestErrors};
use consul_registrar::probe::{self, ConnectError, HealthRpc};
use consul_registrar::sidecar;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;

const EXIT_RUNTIME: u8 = 1;
/// The set-up cannot work (calls reach several Consul agents): change it, restarting won't help.
const EXIT_CONFIG: u8 = 78;
const EXIT_INVALID_MANIFEST: u8 = 65;
const EXIT_UNREADABLE_MANIFEST: u8 = 66;

#[derive(Parser)]
#[command(
    name = "consul-registrar",
    version,
    about = "Keeps an app's Consul registration in step with its gRPC health"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "CONSUL_REGISTRAR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    /// Log level or filter (`info`, `debug`, `consul_registrar=debug,warn`).
    #[arg(
        long,
        global = true,
        env = "CONSUL_REGISTRAR_LOG",
        default_value = "info"
    )]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar: register, follow health, repair drift, drain on SIGTERM/SIGINT.
    Run {
        /// The service manifest.
        #[arg(
            long,
            env = "CONSUL_REGISTRAR_MANIFEST",
            default_value = "/etc/consul-registrar/manifest.yaml"
        )]
        manifest: PathBuf,
        /// Admin server address (/metrics, /healthz, /readyz, /drain, /status); overrides the
        /// manifest's admin.address (default 0.0.0.0:9102).
        #[arg(long, env = "CONSUL_REGISTRAR_ADMIN_ADDR")]
        admin_addr: Option<SocketAddr>,
    },
    /// Check a manifest and print, as JSON, the registrations `run` would send.
    Validate {
        #[arg(
            long,
            env = "CONSUL_REGISTRAR_MANIFEST",
            default_value = "/etc/consul-registrar/manifest.yaml"
        )]
        manifest: PathBuf,
    },
    /// Print the manifest's JSON Schema (for editors: `# yaml-language-server: $schema=...`).
    Schema,
    /// Ask a gRPC health service once (exit codes as grpc_health_probe).
    Probe {
        /// host:port of the gRPC server.
        #[arg(long)]
        addr: String,
        /// Health service name ("" = the whole server).
        #[arg(long, default_value = "")]
        service: String,
        /// Sets both the connect and the RPC timeout.
        #[arg(long, value_parser = parse_duration)]
        timeout: Option<Duration>,
        #[arg(long, value_parser = parse_duration, default_value = "1s")]
        connect_timeout: Duration,
        #[arg(long, value_parser = parse_duration, default_value = "1s")]
        rpc_timeout: Duration,
        /// Use TLS.
        #[arg(long)]
        tls: bool,
        #[arg(long, requires = "tls")]
        tls_ca_cert: Option<PathBuf>,
        #[arg(long, requires = "tls")]
        tls_client_cert: Option<PathBuf>,
        #[arg(long, requires = "tls")]
        tls_client_key: Option<PathBuf>,
        #[arg(long, requires = "tls")]
        tls_server_name: Option<String>,
        /// Accept any server certificate (grpc_health_probe's -tls-no-verify). Without it and
        /// without --tls-ca-cert, the system's CA bundle verifies the server.
        #[arg(long, requires = "tls")]
        tls_no_verify: bool,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    manifest::duration::parse(s).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let probing = std::env::args().nth(1).as_deref() == Some("probe");
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ if probing => ExitCode::from(1),
                _ => ExitCode::from(2),
            };
        }
    };
    init_logging(cli.log_format, &cli.log_level);
    match cli.command {
        Command::Validate { manifest } => validate(&manifest),
        Command::Schema => print_schema(),
        Command::Run {
            manifest,
            admin_addr,
        } => run(&manifest, admin_addr),
        Command::Probe {
            addr,
            service,
            timeout,
            connect_timeout,
            rpc_timeout,
            tls,
            tls_ca_cert,
            tls_client_cert,
            tls_client_key,
            tls_server_name,
            tls_no_verify,
        } => {
            let tls = tls.then_some(manifest::TlsSettings {
                ca_file: tls_ca_cert,
                cert_file: tls_client_cert,
                key_file: tls_client_key,
                server_name: tls_server_name,
                insecure_skip_verify: tls_no_verify,
            });
            probe_once(ProbeArgs {
                addr,
                service,
                connect_timeout: timeout.unwrap_or(connect_timeout),
                rpc_timeout: timeout.unwrap_or(rpc_timeout),
                tls,
            })
        }
    }
}

/// Logs go to stderr, in colour only when stderr is a terminal and `NO_COLOR` is unset or empty
/// (<https://no-color.org>): files, pipes and log collectors get plain text.
fn init_logging(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn load_manifest(path: &std::path::Path) -> Result<manifest::Manifest, ExitCode> {
    manifest::load(path, &Environment::Process).map_err(|e| {
        eprintln!("{e}");
        match e {
            ManifestErrors::Unreadable { .. } => ExitCode::from(EXIT_UNREADABLE_MANIFEST),
            ManifestErrors::Invalid(_) => ExitCode::from(EXIT_INVALID_MANIFEST),
        }
    })
}

fn validate(path: &std::path::Path) -> ExitCode {
    let manifest = match load_manifest(path) {
        Ok(m) => m,
        Err(code) => return code,
    };
    // What the sidecar would send first, in the mode's own shape.
    let registrations = match &manifest.consul.mode {
        ConsulMode::Agent => serde_json::to_value(
            manifest
                .services
                .iter()
                .map(|s| AgentServiceRegistration::new(s, CheckStatus::Critical))
                .collect::<Vec<_>>(),
        ),
        ConsulMode::Catalog(settings) => Ok(serde_json::Value::Array(
            manifest
                .services
                .iter()
                .map(|s| {
                    catalog::registration_body(
                        settings,
                        s,
                        CheckStatus::Critical,
                        "waiting for the first probe",
                        true,
                    )
                })
                .collect(),
        )),
    };
    match registrations.and_then(|r| serde_json::to_string_pretty(&r)) {
        Ok(json) => {
            // A closed pipe (`validate … | head`) is not an error worth a panic.
            use std::io::Write;
            let _ = writeln!(std::io::stdout().lock(), "{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cannot print the registrations: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

fn print_schema() -> ExitCode {
    match serde_json::to_string_pretty(&manifest::schema::json_schema()) {
        Ok(json) => {
            use std::io::Write;
            let _ = writeln!(std::io::stdout().lock(), "{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cannot print the schema: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

fn run(path: &std::path::Path, admin_addr: Option<SocketAddr>) -> ExitCode {
    let manifest = match load_manifest(path) {
        Ok(m) => m,
        Err(code) => return code,
    };
    let admin = admin_addr.unwrap_or(manifest.admin_address);
    let result = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .and_then(|rt| {
            rt.block_on(sidecar::run(manifest, admin, drain_auth()))
                .context("consul-registrar stopped with an error")
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            let config = e
                .downcast_ref::<sidecar::SidecarError>()
                .is_some_and(sidecar::SidecarError::is_configuration);
            ExitCode::from(if config { EXIT_CONFIG } else { EXIT_RUNTIME })
        }
    }
}

/// Who may call `/drain`: `CONSUL_REGISTRAR_DRAIN_TOKEN_FILE` or `CONSUL_REGISTRAR_DRAIN_TOKEN`
/// (environment only: a token on the command line would show in `ps`).
fn drain_auth() -> consul_registrar::admin::DrainAuth {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    consul_registrar::admin::DrainAuth::from_settings(
        var("CONSUL_REGISTRAR_DRAIN_TOKEN").map(|v| v.to_string_lossy().into_owned()),
        var("CONSUL_REGISTRAR_DRAIN_TOKEN_FILE").map(PathBuf::from),
    )
}

struct ProbeArgs {
    addr: String,
    service: String,
    connect_timeout: Duration,
    rpc_timeout: Duration,
    tls: Option<manifest::TlsSettings>,
}

/// grpc_health_probe's exit codes.
fn probe_once(args: ProbeArgs) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let (code, message) = rt.block_on(async {
        let Some((host, port)) = args.addr.rsplit_once(':') else {
            return (1, format!("--addr {:?} must be host:port", args.addr));
        };
        let Ok(port) = port.parse::<u16>() else {
            return (1, format!("--addr {:?}: invalid port", args.addr));
        };
        let spec = manifest::HealthSpec {
            address: host.trim_matches(['[', ']']).to_string(),
            port,
            service: args.service.clone(),
            tls: args.tls.clone(),
            mode: manifest::HealthMode::Poll,
            interval: Duration::from_secs(1),
            timeout: args.connect_timeout,
            success_threshold: 1,
            failure_threshold: 1,
            initial_delay: Duration::ZERO,
        };
        let channel = match probe::connect_http2(&spec, args.connect_timeout).await {
            Ok(channel) => channel,
            Err(ConnectError::Setup(e)) => return (1, e.to_string()),
            Err(ConnectError::TimedOut(_)) => {
                return (
                    2,
                    format!(
                        "timeout: failed to connect service {:?} within {:?}",
                        args.addr, args.connect_timeout
                    ),
                );
            }
            Err(e) => {
                return (
                    2,
                    format!(
                        "error: failed to connect service at {:?}: {}",
                        args.addr,
                        consul_registrar::error_chain(&e)
                    ),
                );
            }
        };
        let mut client = HealthRpc::new(channel);
        let request = HealthCheckRequest {
            service: args.service.clone(),
        };
        match tokio::time::timeout(args.rpc_timeout, client.check(request)).await {
            Err(_) => (
                3,
                format!(
                    "timeout: health rpc did not complete within {:?}",
                    args.rpc_timeout
                ),
            ),
            Ok(Err(status)) => (
                3,
                format!(
                    "error: health rpc failed: {}: {}",
                    status.code(),
                    status.message()
                ),
            ),
            Ok(Ok(resp)) => match ServingStatus::try_from(resp.into_inner().status) {
                Ok(ServingStatus::Serving) => (0, "status: SERVING".to_string()),
                Ok(other) => (
                    4,
                    format!(
                        "service unhealthy (responded with {:?})",
                        other.as_str_name()
                    ),
                ),
                Err(_) => (4, "service unhealthy (unknown status)".to_string()),
            },
        }
    });
    if code == 0 {
        println!("{message}");
    } else {
        eprintln!("{message}");
    }
    ExitCode::from(code)
}
