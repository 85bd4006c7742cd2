//! The health probe: asks the app's `grpc.health.v1.Health` service whether it is serving and turns
//! the answers into a verdict (passing or critical) with success and failure thresholds.
//!
//! Two sources feed one verdict:
//! - a streaming `Watch` (modes `auto` and `watch`), so status changes arrive at once;
//! - a unary `Check` every `interval`, which is the whole probe in `poll` mode and the liveness
//!   sample otherwise (a hung app keeps its stream open but stops answering; HTTP/2 keepalive pings
//!   are no substitute because grpc-go servers punish frequent pings).
//!
//! An explicit NOT_SERVING / SERVICE_UNKNOWN counts at once; errors and timeouts count towards
//! `failureThreshold`, SERVING answers towards `successThreshold`; nothing counts before
//! `initialDelay`. In `auto` mode an UNIMPLEMENTED `Watch` falls back to polling. One error counts
//! at once too: a refused connection right after an open Watch stream ended is the app gone (it
//! crashed, or was OOM-killed: its process is not there), not a blip to sample again.
//!
//! A connection that went half-open (the peer vanished without a FIN or RST: a rescheduled remote
//! target, a NAT or load balancer that dropped its state) would be reused until the kernel gives
//! up, minutes later: every Check on it times out. After `failureThreshold` Check timeouts in a
//! row, during which nothing at all came back over the connection (a slow app still answers some
//! calls, and is not reconnected to), the probe replaces the target's channel with a new one,
//! which opens a new connection ([`TargetChannel`]). HTTP/2 keepalive pings would find such a connection too, but grpc-go
//! servers answer pings more frequent than their enforcement policy allows (5 min by default) with
//! GOAWAY `too_many_pings`, so the rebuild is the remedy.
//!
//! [`connect_http2`] is the one-shot `probe` command's connect, which waits, as
//! grpc_health_probe does, until the server has spoken HTTP/2.

use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::codec::{BufferSettings, Codec, Streaming};
use tonic::codegen::Service;
use tonic::codegen::http::Uri;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_prost::{ProstDecoder, ProstEncoder};

use crate::consul::CheckStatus;
use crate::manifest::{HealthMode, HealthSpec, TlsSettings};
use crate::metrics::Metrics;
use crate::status::StatusEntry;

/// The output of the TTL check before the first successful probe.
pub const WAITING_OUTPUT: &str = "waiting for first successful probe";

/// Watch mode's verdict on an app that answers Watch with UNIMPLEMENTED.
const WATCH_UNIMPLEMENTED: &str =
    "the app does not implement the Watch RPC (use health.mode auto or poll)";

/// The probe's current judgement of the app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub status: CheckStatus,
    /// Human-readable: what the probe saw. Stable while the status is unchanged.
    pub output: String,
    /// When the status last changed (for the sync-lag metric).
    pub changed_at: Instant,
}

impl Verdict {
    pub fn waiting() -> Self {
        Verdict {
            status: CheckStatus::Critical,
            output: WAITING_OUTPUT.to_string(),
            changed_at: Instant::now(),
        }
    }
}

/// Counts consecutive successes and failures and decides when the verdict flips.
#[derive(Debug)]
pub struct Thresholds {
    success_threshold: u32,
    failure_threshold: u32,
    successes: u32,
    failures: u32,
    current: CheckStatus,
}

impl Thresholds {
    pub fn new(success_threshold: u32, failure_threshold: u32) -> Self {
        Thresholds {
            success_threshold: success_threshold.max(1),
            failure_threshold: failure_threshold.max(1),
            successes: 0,
            failures: 0,
            current: CheckStatus::Critical,
        }
    }

    /// A SERVING answer. Returns the new status when it flips.
    pub fn success(&mut self) -> Option<CheckStatus> {
        self.failures = 0;
        self.successes = self.successes.saturating_add(1);
        self.flip_to(
            CheckStatus::Passing,
            self.successes >= self.success_threshold,
        )
    }

    /// An error or timeout. Returns the new status when it flips.
    pub fn failure(&mut self) -> Option<CheckStatus> {
        self.successes = 0;
        self.failures = self.failures.saturating_add(1);
        self.flip_to(
            CheckStatus::Critical,
            self.failures >= self.failure_threshold,
        )
    }

    /// An explicit "not serving": critical at once.
    pub fn unhealthy(&mut self) -> Option<CheckStatus> {
        self.successes = 0;
        self.failures = self.failure_threshold;
        self.flip_to(CheckStatus::Critical, true)
    }

    fn flip_to(&mut self, status: CheckStatus, reached: bool) -> Option<CheckStatus> {
        if reached && self.current != status {
            self.current = status;
            Some(status)
        } else {
            None
        }
    }
}

/// One observation of the app.
#[derive(Debug, Clone)]
enum Observation {
    Serving,
    NotServing(String),
    Failed {
        outcome: &'static str,
        reason: String,
        /// The connection to the app was refused (nothing listens on its port).
        refused: bool,
    },
    /// The app is gone: critical at once (see the module header).
    Gone(String),
}

enum Event {
    /// A status pushed on the Watch stream.
    Watched(Observation),
    /// An open Watch stream ended (not counted; triggers a Check).
    StreamBroken,
    /// The app does not implement Watch.
    WatchUnimplemented,
    /// A Check finished; `started` orders it against Watch events, `channel` is the generation
    /// of the target's channel it used.
    Checked {
        started: Instant,
        channel: u64,
        observation: Observation,
    },
}

/// A lazily connecting channel to the probe target; probes of the same target share one.
pub fn channel_for(spec: &HealthSpec) -> Result<TargetChannel, ProbeSetupError> {
    let endpoint = endpoint_for(spec)?;
    let channel = endpoint.connect_lazy();
    Ok(TargetChannel {
        endpoint,
        current: Arc::new(watch::Sender::new((0, channel))),
        answered: Arc::new(std::sync::Mutex::new(Instant::now())),
    })
}

/// The channel to one probe target, shared by every probe of that target, and replaceable: when
/// a probe sees `failureThreshold` Check timeouts in a row it calls [`TargetChannel::rebuild`],
/// and every probe of the target moves to the new channel (a new connection; the old one is
/// closed once its last call ends). Each channel has a generation, so that probes which saw the
/// same dead connection replace it once, not once each; and the time of the last answer over it,
/// so that a connection which still carries answers (an app slow to some calls, many probes of
/// one target on a busy machine) is kept.
#[derive(Clone)]
pub struct TargetChannel {
    endpoint: Endpoint,
    current: Arc<watch::Sender<(u64, Channel)>>,
    /// When an answer last came over the current channel (or when it was made).
    answered: Arc<std::sync::Mutex<Instant>>,
}

impl TargetChannel {
    /// The channel now, and its generation.
    pub fn current(&self) -> (u64, Channel) {
        self.current.borrow().clone()
    }

    /// An answer (a status or an RPC error, not a timeout) came over the channel of generation
    /// `generation`: the connection is alive.
    pub fn answered(&self, generation: u64) {
        if self.current.borrow().0 == generation {
            *self.answered.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        }
    }

    /// Replaces the channel of generation `seen` with a new one, unless it was replaced already
    /// or an answer came over it after `since` (the start of the first of the timed-out calls).
    /// Returns whether this call replaced it.
    pub fn rebuild(&self, seen: u64, since: Instant) -> bool {
        self.current.send_if_modified(|(generation, channel)| {
            let mut answered = self.answered.lock().unwrap_or_else(|p| p.into_inner());
            if *generation != seen || *answered > since {
                return false;
            }
            *generation += 1;
            *channel = self.endpoint.connect_lazy();
            *answered = Instant::now();
            true
        })
    }

    /// Notified on every replacement.
    fn subscribe(&self) -> watch::Receiver<(u64, Channel)> {
        self.current.subscribe()
    }
}

/// The gRPC endpoint of the probe target (address, connect timeout, TLS).
pub fn endpoint_for(spec: &HealthSpec) -> Result<Endpoint, ProbeSetupError> {
    let scheme = if spec.tls.is_some() { "https" } else { "http" };
    let host = if spec.address.contains(':') {
        format!("[{}]", spec.address)
    } else {
        spec.address.clone()
    };
    let uri = format!("{scheme}://{host}:{}", spec.port);
    let mut endpoint = Endpoint::from_shared(uri.clone())
        .map_err(|e| ProbeSetupError(format!("{uri}: {e}")))?
        .connect_timeout(spec.timeout)
        .tcp_nodelay(true);
    if let Some(tls) = &spec.tls {
        let (config, verifier) = client_tls(tls, &spec.address, &uri)?;
        endpoint = endpoint
            .tls_config_with_verifier(config, verifier)
            .map_err(|e| ProbeSetupError(format!("TLS for {uri}: {e}")))?;
    }
    Ok(endpoint)
}

/// The TLS settings towards the app and the verifier of its certificate: against `caFile` when
/// given, else against the system's CA bundle (SSL_CERT_FILE / SSL_CERT_DIR or the distribution's),
/// or not at all with `insecureSkipVerify`.
fn client_tls(
    tls: &TlsSettings,
    address: &str,
    uri: &str,
) -> Result<(ClientTlsConfig, Arc<dyn ServerCertVerifier>), ProbeSetupError> {
    crate::consul::install_crypto_provider();
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| ProbeSetupError(format!("cannot read {}: {e}", p.display())))
    };
    let mut config = ClientTlsConfig::new().domain_name(
        tls.server_name
            .clone()
            .unwrap_or_else(|| address.to_string()),
    );
    if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
        config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    if tls.insecure_skip_verify {
        tracing::warn!(target = %uri, "health.tls.insecureSkipVerify is on: the app's certificate is not verified, anyone on the path can answer the probe");
        return Ok((config, Arc::new(AnyServerCert(provider))));
    }
    let mut roots = rustls::RootCertStore::empty();
    match &tls.ca_file {
        Some(ca) => {
            let pem = read(ca)?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| {
                    ProbeSetupError(format!("{} is not a PEM CA bundle: {e}", ca.display()))
                })?;
                roots.add(cert).map_err(|e| {
                    ProbeSetupError(format!("{}: unusable CA certificate: {e}", ca.display()))
                })?;
            }
            if roots.is_empty() {
                return Err(ProbeSetupError(format!(
                    "{} holds no PEM certificate (health.tls.caFile)",
                    ca.display()
                )));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found
                    .errors
                    .first()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default();
                return Err(ProbeSetupError(format!(
                    "TLS to {uri} without health.tls.caFile uses the system's CA bundle, but none was found{why} (looked at SSL_CERT_FILE, SSL_CERT_DIR and the usual system paths); set health.tls.caFile to the CA that signed the app's certificate"
                )));
            }
        }
    }
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| ProbeSetupError(format!("TLS for {uri}: {e}")))?;
    Ok((config, verifier))
}

/// `insecureSkipVerify`: accepts any certificate the app presents (the handshake signatures are
/// still checked, so the connection is encrypted, but to whoever answers).
#[derive(Debug)]
struct AnyServerCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Connects to the probe target the way grpc_health_probe's blocking grpc-go dial does, for the
/// one-shot `probe` command: the connection counts only once the server speaks HTTP/2 — its first
/// frame, a SETTINGS frame, has arrived (plaintext), or TLS has negotiated `h2` (over TLS the bytes
/// are not visible here) — within `timeout`. So an HTTP/1 server, or one that accepts and never
/// answers, is a connection failure (grpc_health_probe's exit code 2), not a failed RPC (3).
pub async fn connect_http2(spec: &HealthSpec, timeout: Duration) -> Result<Channel, ConnectError> {
    let endpoint = endpoint_for(spec)?;
    let deadline = tokio::time::Instant::now() + timeout;
    let (report, mut first_frame) = watch::channel(None);
    let report = spec.tls.is_none().then(|| Arc::new(report));
    let connector = WatchedConnector(move || FirstFrameWatch {
        header: [0; 9],
        seen: 0,
        report: report.clone(),
    });
    let channel =
        match tokio::time::timeout_at(deadline, endpoint.connect_with_connector(connector)).await {
            Err(_) => return Err(ConnectError::TimedOut(timeout)),
            Ok(Err(e)) => return Err(ConnectError::Failed(crate::error_chain(&e))),
            Ok(Ok(channel)) => channel,
        };
    if spec.tls.is_some() {
        return Ok(channel);
    }
    match tokio::time::timeout_at(deadline, first_frame.wait_for(Option::is_some)).await {
        Err(_) => Err(ConnectError::TimedOut(timeout)),
        Ok(Ok(seen)) if *seen == Some(true) => Ok(channel),
        Ok(_) => Err(ConnectError::NotHttp2),
    }
}

/// Why [`connect_http2`] found no HTTP/2 server.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Setup(#[from] ProbeSetupError),
    #[error("{0}")]
    Failed(String),
    #[error("the server did not answer with HTTP/2 (its first bytes are no SETTINGS frame)")]
    NotHttp2,
    #[error("no HTTP/2 answer within {}", crate::manifest::duration::format(*.0))]
    TimedOut(Duration),
}

/// What a [`WatchedTcp`] stream tells its watcher.
pub(crate) trait TcpWatcher: Send + Unpin + 'static {
    /// Bytes arrived from the server.
    fn read(&mut self, _bytes: &[u8]) {}
    /// The server closed the stream (end of stream), or reading or writing failed.
    fn closed(&mut self) {}
    /// The stream was dropped: the connection over it is over.
    fn dropped(&mut self) {}
}

/// Makes TCP connections (no delay, like tonic's own) for `Endpoint::connect_with_connector`,
/// each with a watcher from `make`.
#[derive(Clone)]
pub(crate) struct WatchedConnector<F>(pub F);

impl<W, F> Service<Uri> for WatchedConnector<F>
where
    W: TcpWatcher,
    F: Fn() -> W + Clone + Send + 'static,
{
    type Response = TokioIo<WatchedTcp<W>>;
    type Error = std::io::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let watcher = (self.0)();
        Box::pin(async move {
            let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host, port)).await?;
            tcp.set_nodelay(true)?;
            Ok(TokioIo::new(WatchedTcp {
                inner: tcp,
                watcher,
            }))
        })
    }
}

/// A TCP stream that passes everything through and tells its watcher what it saw.
pub(crate) struct WatchedTcp<W: TcpWatcher> {
    inner: TcpStream,
    watcher: W,
}

impl<W: TcpWatcher> Drop for WatchedTcp<W> {
    fn drop(&mut self) {
        self.watcher.dropped();
    }
}

impl<W: TcpWatcher> AsyncRead for WatchedTcp<W> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let wanted = buf.remaining() > 0;
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        match &result {
            Poll::Ready(Ok(())) if buf.filled().len() == before => {
                if wanted {
                    self.watcher.closed();
                }
            }
            Poll::Ready(Ok(())) => {
                let this = &mut *self;
                this.watcher.read(&buf.filled()[before..]);
            }
            Poll::Ready(Err(_)) => self.watcher.closed(),
            Poll::Pending => {}
        }
        result
    }
}

impl<W: TcpWatcher> AsyncWrite for WatchedTcp<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Err(_)) = &result {
            self.watcher.closed();
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Err(_)) = &result {
            self.watcher.closed();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Judges the first 9 bytes the server sends: an HTTP/2 frame header of a SETTINGS frame (type 4,
/// not an ACK, stream 0) or not. Without `report` (over TLS, where the bytes are ciphertext) it
/// judges nothing.
struct FirstFrameWatch {
    header: [u8; 9],
    seen: usize,
    /// `Some(true)` once a connection saw a SETTINGS frame first, `Some(false)` on anything else.
    report: Option<Arc<watch::Sender<Option<bool>>>>,
}

impl FirstFrameWatch {
    fn is_settings(h: &[u8; 9]) -> bool {
        let length = u32::from_be_bytes([0, h[0], h[1], h[2]]);
        let stream = u32::from_be_bytes([h[5] & 0x7f, h[6], h[7], h[8]]);
        h[3] == 0x4 && h[4] & 0x1 == 0 && stream == 0 && length.is_multiple_of(6)
    }

    fn judge(&mut self, verdict: bool) {
        if let Some(report) = self.report.take() {
            // The first connection to judge decides.
            report.send_if_modified(|seen| {
                let first = seen.is_none();
                if first {
                    *seen = Some(verdict);
                }
                first
            });
        }
    }
}

impl TcpWatcher for FirstFrameWatch {
    fn read(&mut self, bytes: &[u8]) {
        if self.report.is_none() {
            return;
        }
        let seen = self.seen;
        let take = bytes.len().min(9 - seen);
        self.header[seen..seen + take].copy_from_slice(&bytes[..take]);
        self.seen += take;
        if self.seen == 9 {
            let verdict = Self::is_settings(&self.header);
            self.judge(verdict);
        }
    }

    /// Closed before a whole frame header.
    fn closed(&mut self) {
        self.judge(false);
    }
}

/// The probe could not be set up (bad address or TLS files).
#[derive(Debug, thiserror::Error)]
#[error("health probe: {0}")]
pub struct ProbeSetupError(String);

/// Probes one health service and publishes the verdict.
pub struct HealthProbe {
    spec: HealthSpec,
    channel: TargetChannel,
    labels: [String; 2],
    metrics: Arc<Metrics>,
    status: StatusEntry,
}

impl HealthProbe {
    pub fn new(
        spec: HealthSpec,
        channel: TargetChannel,
        service: &str,
        instance: &str,
        metrics: Arc<Metrics>,
        status: StatusEntry,
    ) -> Self {
        HealthProbe {
            spec,
            channel,
            labels: [service.to_string(), instance.to_string()],
            metrics,
            status,
        }
    }

    fn target(&self) -> String {
        format!(
            "{:?} at {}:{}",
            self.spec.service, self.spec.address, self.spec.port
        )
    }

    /// Runs until `cancel`, sending every verdict change on `verdicts`.
    pub async fn run(self, verdicts: watch::Sender<Verdict>, cancel: CancellationToken) {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(self.spec.initial_delay) => {}
        }
        let (events_tx, mut events) = mpsc::channel::<Event>(16);
        let child = cancel.child_token();
        let _stop_children = child.clone().drop_guard();
        if self.spec.mode != HealthMode::Poll {
            tokio::spawn(watch_stream(
                self.channel.clone(),
                self.spec.service.clone(),
                self.spec.interval,
                events_tx.clone(),
                child.clone(),
            ));
        }
        let mut thresholds =
            Thresholds::new(self.spec.success_threshold, self.spec.failure_threshold);
        let mut ticker = tokio::time::interval(self.spec.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut check_in_flight = false;
        let mut check_due = false;
        let mut last_watch_event = Instant::now() - Duration::from_secs(3600);
        let mut watching = self.spec.mode != HealthMode::Poll;
        // Watch mode, and the app answered Watch with UNIMPLEMENTED: every Check counts as that
        // failure (a SERVING Check must not pass for a Watch the mode asked for) until the
        // stream, tried again, answers.
        let mut watch_refused = false;
        let mut timeouts = Timeouts::default();
        // An open Watch stream ended and nothing answered since: a refused connection now is the
        // app gone.
        let mut stream_ended = false;
        loop {
            let observation = tokio::select! {
                _ = cancel.cancelled() => return,
                _ = ticker.tick() => {
                    if check_in_flight {
                        // A slow Check (up to `timeout`) must not halve the sampling rate: run the
                        // next one as soon as this one ends.
                        check_due = true;
                    } else {
                        check_in_flight = true;
                        self.spawn_check(events_tx.clone());
                    }
                    continue;
                }
                event = events.recv() => match event {
                    // Both senders live in this function: the channel cannot close.
                    None => return,
                    Some(Event::Watched(o)) => {
                        last_watch_event = Instant::now();
                        stream_ended = false;
                        watch_refused = false;
                        self.set_mode("watch");
                        o
                    }
                    Some(Event::StreamBroken) => {
                        stream_ended = true;
                        if !check_in_flight {
                            check_in_flight = true;
                            self.spawn_check(events_tx.clone());
                        }
                        continue;
                    }
                    Some(Event::WatchUnimplemented) => {
                        watching = false;
                        if self.spec.mode == HealthMode::Watch {
                            watch_refused = true;
                            Observation::NotServing(WATCH_UNIMPLEMENTED.into())
                        } else {
                            tracing::info!(target = %self.target(), "app does not implement Watch; polling Check instead");
                            continue;
                        }
                    }
                    Some(Event::Checked { started, channel, observation }) => {
                        check_in_flight = false;
                        self.count_timeouts(&observation, channel, started, &mut timeouts);
                        if std::mem::take(&mut check_due) {
                            check_in_flight = true;
                            self.spawn_check(events_tx.clone());
                        }
                        if started < last_watch_event {
                            continue; // older than what the stream told us
                        }
                        if watch_refused {
                            Observation::NotServing(WATCH_UNIMPLEMENTED.into())
                        } else {
                        if !watching {
                            self.set_mode("poll");
                        }
                        match observation {
                            Observation::Failed { refused: true, .. } if stream_ended => {
                                Observation::Gone(
                                    "the app is gone: its Watch stream ended and its port refuses connections".into(),
                                )
                            }
                            Observation::Failed { .. } => observation,
                            _ => {
                                stream_ended = false;
                                observation
                            }
                        }
                        }
                    }
                },
            };
            self.observe(&observation, &mut thresholds, &verdicts);
        }
    }

    /// Counts Check timeouts in a row; at `failureThreshold`, when nothing came over the
    /// connection meanwhile, the target's channel is replaced (see the module header: a
    /// half-open connection).
    fn count_timeouts(
        &self,
        observation: &Observation,
        channel: u64,
        started: Instant,
        timeouts: &mut Timeouts,
    ) {
        let timed_out = matches!(
            observation,
            Observation::Failed {
                outcome: "timeout",
                ..
            }
        );
        if !timed_out {
            self.channel.answered(channel);
            *timeouts = Timeouts::default();
            return;
        }
        let since = *timeouts.since.get_or_insert(started);
        timeouts.count = timeouts.count.saturating_add(1);
        if timeouts.count < self.spec.failure_threshold.max(1) {
            return;
        }
        *timeouts = Timeouts::default();
        if self.channel.rebuild(channel, since) {
            tracing::warn!(
                target = %self.target(),
                checks = self.spec.failure_threshold,
                "Checks timed out in a row: connecting anew (the connection may be half-open)"
            );
        }
    }

    fn spawn_check(&self, events: mpsc::Sender<Event>) {
        let (generation, channel) = self.channel.current();
        let mut client = HealthRpc::new(channel);
        let request = HealthCheckRequest {
            service: self.spec.service.clone(),
        };
        let timeout = self.spec.timeout;
        let histogram = self
            .metrics
            .probe_duration
            .with_label_values(&[&self.labels[0], &self.labels[1]]);
        tokio::spawn(async move {
            let started = Instant::now();
            let result = tokio::time::timeout(timeout, client.check(request)).await;
            histogram.observe(started.elapsed().as_secs_f64());
            let observation = match result {
                Err(_) => Observation::Failed {
                    outcome: "timeout",
                    reason: format!(
                        "Check timed out after {}",
                        crate::manifest::duration::format(timeout)
                    ),
                    refused: false,
                },
                Ok(Ok(resp)) => from_serving_status(resp.into_inner().status),
                Ok(Err(status)) => from_rpc_error(&status),
            };
            let _ = events
                .send(Event::Checked {
                    started,
                    channel: generation,
                    observation,
                })
                .await;
        });
    }

    fn set_mode(&self, mode: &'static str) {
        self.status.update(|s| s.probe.mode = mode);
    }

    fn observe(
        &self,
        observation: &Observation,
        thresholds: &mut Thresholds,
        verdicts: &watch::Sender<Verdict>,
    ) {
        let outcome = match observation {
            Observation::Serving => "serving",
            Observation::NotServing(r) if r.contains("SERVICE_UNKNOWN") => "service_unknown",
            Observation::NotServing(_) => "not_serving",
            Observation::Failed { outcome, .. } => outcome,
            Observation::Gone(_) => "error",
        };
        self.metrics
            .probe_results
            .with_label_values(&[&self.labels[0], &self.labels[1], outcome])
            .inc();
        let (flip, output) = match observation {
            Observation::Serving => (
                thresholds.success(),
                format!("gRPC health of {}: SERVING", self.target()),
            ),
            Observation::NotServing(reason) => (
                thresholds.unhealthy(),
                format!("gRPC health of {}: {reason}", self.target()),
            ),
            Observation::Failed { reason, .. } => (
                thresholds.failure(),
                format!(
                    "gRPC health probe of {} failed {} times in a row: {reason}",
                    self.target(),
                    self.spec.failure_threshold
                ),
            ),
            Observation::Gone(reason) => (
                thresholds.unhealthy(),
                format!("gRPC health of {}: {reason}", self.target()),
            ),
        };
        let error = match observation {
            Observation::Serving => None,
            Observation::NotServing(r)
            | Observation::Failed { reason: r, .. }
            | Observation::Gone(r) => Some(r.clone()),
        };
        self.status.update(|s| s.probe.last_error = error);
        let Some(status) = flip else { return };
        let [service, instance] = &self.labels;
        tracing::info!(%service, %instance, %status, %output, "health verdict changed");
        self.metrics
            .health_transitions
            .with_label_values(&[service, instance, status.as_str()])
            .inc();
        self.metrics
            .instance_healthy
            .with_label_values(&[service, instance])
            .set(i64::from(status == CheckStatus::Passing));
        self.status.update(|s| {
            s.probe.verdict = status.as_str();
            s.probe.output = output.clone();
            s.probe.changed_at = SystemTime::now();
        });
        verdicts.send_replace(Verdict {
            status,
            output,
            changed_at: Instant::now(),
        });
    }
}

/// Check timeouts in a row, and when the first of them started.
#[derive(Default)]
struct Timeouts {
    count: u32,
    since: Option<Instant>,
}

/// Keeps a Watch stream open, forwarding statuses; reconnects with backoff up to `interval`, and
/// at once on the target's new channel when the channel is replaced (a stream on a half-open
/// connection would wait forever).
async fn watch_stream(
    target: TargetChannel,
    service: String,
    interval: Duration,
    events: mpsc::Sender<Event>,
    cancel: CancellationToken,
) {
    let mut replaced = target.subscribe();
    let mut backoff = Duration::from_millis(50);
    loop {
        replaced.mark_unchanged();
        let (generation, channel) = target.current();
        let mut client = HealthRpc::new(channel);
        let opened = tokio::select! {
            _ = cancel.cancelled() => return,
            _ = replaced.changed() => continue,
            // Boxed: the call's state is needed only while the stream opens, and the task lives
            // as long as the instance.
            r = Box::pin(client.watch(HealthCheckRequest { service: service.clone() })) => r,
        };
        match opened {
            Ok(resp) => {
                let mut stream = resp.into_inner();
                loop {
                    let message = tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = replaced.changed() => break,
                        m = stream.message() => m,
                    };
                    match message {
                        Ok(Some(m)) => {
                            backoff = Duration::from_millis(50);
                            target.answered(generation);
                            if events
                                .send(Event::Watched(from_serving_status(m.status)))
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                        Ok(None) | Err(_) => break,
                    }
                }
                // An open stream broke (the app stopped or restarted): check at once. Failed
                // re-opens are not reported, so failures are still sampled once per interval.
                if events.send(Event::StreamBroken).await.is_err() {
                    return;
                }
            }
            Err(status) if status.code() == Code::Unimplemented => {
                if events.send(Event::WatchUnimplemented).await.is_err() {
                    return;
                }
                // In `auto` mode the prober now polls; look again now and then in case the app
                // was replaced by a version that implements Watch.
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(interval.max(Duration::from_secs(30))) => {}
                }
                continue;
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(interval);
    }
}

fn from_serving_status(status: i32) -> Observation {
    match ServingStatus::try_from(status) {
        Ok(ServingStatus::Serving) => Observation::Serving,
        Ok(ServingStatus::NotServing) => Observation::NotServing("NOT_SERVING".into()),
        Ok(ServingStatus::ServiceUnknown) => Observation::NotServing("SERVICE_UNKNOWN".into()),
        Ok(ServingStatus::Unknown) | Err(_) => {
            Observation::NotServing(format!("UNKNOWN ({status})"))
        }
    }
}

fn from_rpc_error(status: &Status) -> Observation {
    match status.code() {
        // The standard health server answers NOT_FOUND for a service it does not know.
        Code::NotFound => Observation::NotServing("SERVICE_UNKNOWN (NOT_FOUND)".into()),
        Code::DeadlineExceeded => Observation::Failed {
            outcome: "timeout",
            reason: "Check deadline exceeded".into(),
            refused: false,
        },
        code => Observation::Failed {
            outcome: "error",
            reason: format!("{code:?}: {}", short(&with_causes(status))),
            refused: connection_refused(status),
        },
    }
}

/// Whether the call failed because the connection to the app was refused.
fn connection_refused(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return true;
        }
        source = e.source();
    }
    false
}

/// The status message and its causes ("transport error" alone says little; the cause says
/// "invalid peer certificate: UnknownIssuer" or "connection refused").
pub fn with_causes(status: &Status) -> String {
    let mut out = status.message().to_string();
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        let text = e.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = e.source();
    }
    out
}

fn short(s: &str) -> String {
    s.chars().take(200).collect()
}

/// The two `grpc.health.v1.Health` calls, with codec buffers sized for health messages.
///
/// tonic's generated client gives every call an 8 KiB encode buffer and keeps it for as long as the
/// call lives, which for `Watch` is the life of the stream: a sidecar with 1,000 instances held
/// 8 MiB in those buffers alone (measured with heaptrack). A health request or answer is a few
/// bytes; the buffers still grow when a message needs more.
#[derive(Clone)]
pub struct HealthRpc {
    grpc: tonic::client::Grpc<Channel>,
}

impl HealthRpc {
    pub fn new(channel: Channel) -> Self {
        HealthRpc {
            grpc: tonic::client::Grpc::new(channel),
        }
    }

    /// The unary `Check`.
    pub async fn check(
        &mut self,
        request: HealthCheckRequest,
    ) -> Result<tonic::Response<HealthCheckResponse>, Status> {
        self.ready().await?;
        let path = PathAndQuery::from_static("/grpc.health.v1.Health/Check");
        self.grpc
            .unary(tonic::Request::new(request), path, HealthCodec)
            .await
    }

    /// The server-streaming `Watch`.
    pub async fn watch(
        &mut self,
        request: HealthCheckRequest,
    ) -> Result<tonic::Response<Streaming<HealthCheckResponse>>, Status> {
        self.ready().await?;
        let path = PathAndQuery::from_static("/grpc.health.v1.Health/Watch");
        self.grpc
            .server_streaming(tonic::Request::new(request), path, HealthCodec)
            .await
    }

    async fn ready(&mut self) -> Result<(), Status> {
        self.grpc
            .ready()
            .await
            .map_err(|e| Status::unknown(format!("Service was not ready: {e}")))
    }
}

/// Protobuf encoding of the health messages with small initial buffers.
#[derive(Clone, Copy)]
struct HealthCodec;

impl HealthCodec {
    /// Room for a request naming a service, and more than any health answer.
    const BUFFER_SIZE: usize = 256;
    /// tonic's default: how much is encoded before the encoder yields.
    const YIELD_THRESHOLD: usize = 32 * 1024;

    fn buffers() -> BufferSettings {
        BufferSettings::new(Self::BUFFER_SIZE, Self::YIELD_THRESHOLD)
    }
}

impl Codec for HealthCodec {
    type Encode = HealthCheckRequest;
    type Decode = HealthCheckResponse;
    type Encoder = ProstEncoder<HealthCheckRequest>;
    type Decoder = ProstDecoder<HealthCheckResponse>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(Self::buffers())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(Self::buffers())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_threshold_must_be_reached_to_pass() {
        let mut t = Thresholds::new(2, 3);
        assert_eq!(t.success(), None);
        assert_eq!(t.success(), Some(CheckStatus::Passing));
        assert_eq!(t.success(), None);
    }

    #[test]
    fn failures_count_up_to_the_threshold_and_reset_on_success() {
        let mut t = Thresholds::new(1, 3);
        assert_eq!(t.success(), Some(CheckStatus::Passing));
        assert_eq!(t.failure(), None);
        assert_eq!(t.failure(), None);
        assert_eq!(t.success(), None);
        assert_eq!(t.failure(), None);
        assert_eq!(t.failure(), None);
        assert_eq!(t.failure(), Some(CheckStatus::Critical));
    }

    #[test]
    fn not_serving_is_critical_at_once() {
        let mut t = Thresholds::new(1, 5);
        assert_eq!(t.success(), Some(CheckStatus::Passing));
        assert_eq!(t.unhealthy(), Some(CheckStatus::Critical));
        assert_eq!(t.failure(), None);
        assert_eq!(t.success(), Some(CheckStatus::Passing));
    }

    #[test]
    fn only_a_settings_frame_header_counts_as_http2() {
        let settings = [0, 0, 12, 4, 0, 0, 0, 0, 0];
        assert!(FirstFrameWatch::is_settings(&settings));
        let ack = [0, 0, 0, 4, 1, 0, 0, 0, 0];
        assert!(!FirstFrameWatch::is_settings(&ack), "an ACK is no preface");
        let on_stream = [0, 0, 0, 4, 0, 0, 0, 0, 1];
        assert!(!FirstFrameWatch::is_settings(&on_stream));
        let http1: [u8; 9] = *b"HTTP/1.1 ";
        assert!(!FirstFrameWatch::is_settings(&http1));
    }

    #[test]
    fn serving_statuses_map_to_observations() {
        assert!(matches!(from_serving_status(1), Observation::Serving));
        assert!(matches!(from_serving_status(2), Observation::NotServing(_)));
        assert!(
            matches!(from_serving_status(3), Observation::NotServing(s) if s.contains("SERVICE_UNKNOWN"))
        );
        assert!(matches!(
            from_rpc_error(&Status::not_found("x")),
            Observation::NotServing(_)
        ));
        assert!(matches!(
            from_rpc_error(&Status::unavailable("x")),
            Observation::Failed {
                outcome: "error",
                ..
            }
        ));
    }
}
