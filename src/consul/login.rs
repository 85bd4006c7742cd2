//! Logging in with a Consul auth method (`consul.login`), the way consul-k8s workloads get their
//! token: `POST /v1/acl/login` with the pod's service account token (the bearer token file)
//! before the first call, the token it returns on every call, a new login when a call answers
//! 403 "ACL not found" (the token was deleted or expired) or when the bearer token file changed
//! (projected service account tokens rotate; the replaced token is logged out at the next
//! rotation), and `POST /v1/acl/logout` after the drain, so no login token is left behind as an
//! ACL object. Each new token is a new token generation: the reconcilers register their
//! instances again with it. The token (SecretID) is a [`Secret`]: never
//! logged, never in an error, `/status` or a metric label; the AccessorID, which grants nothing,
//! is what the log names.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use reqwest::Method;
use serde::Deserialize;

use super::{ConsulClient, ConsulError, REQUEST_TIMEOUT};
use crate::manifest::{LoginSettings, Secret};

/// How often the bearer token file is looked at (its modification time; read when that changed).
const BEARER_RECHECK: Duration = Duration::from_secs(1);
/// After a failed login, calls within this long get the same error instead of a login each:
/// a thousand instances must not send a thousand logins to a misconfigured auth method.
const FAILED_LOGIN_HOLD: Duration = Duration::from_secs(1);
/// The logout after the drain may take this long (it comes after the drain's own budget).
pub const LOGOUT_TIMEOUT: Duration = Duration::from_secs(2);

/// The login state of one client: the token held, and what it was got with.
pub(super) struct Login {
    settings: LoginSettings,
    held: std::sync::Mutex<Option<Held>>,
    /// When the bearer token file was last looked at.
    checked_at: std::sync::Mutex<Instant>,
    /// One login (or logout) at a time; holds the last failure.
    flight: tokio::sync::Mutex<Option<(Instant, String)>>,
    /// Logged out after the drain: no call logs in again.
    closed: AtomicBool,
    /// The token a rotation replaced: logged out at the next rotation or after the drain.
    previous: std::sync::Mutex<Option<Held>>,
}

/// A token from a login.
#[derive(Clone)]
struct Held {
    secret: Secret,
    accessor: String,
    /// The bearer token it was got with, and the file's modification time then.
    bearer: Secret,
    modified: Option<SystemTime>,
}

impl Login {
    pub(super) fn new(settings: LoginSettings) -> Self {
        Login {
            settings,
            held: std::sync::Mutex::new(None),
            checked_at: std::sync::Mutex::new(Instant::now()),
            flight: tokio::sync::Mutex::new(None),
            closed: AtomicBool::new(false),
            previous: std::sync::Mutex::new(None),
        }
    }

    fn held(&self) -> Option<Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether the bearer token file is due a look (and marks it looked at).
    fn bearer_due(&self) -> bool {
        let mut at = self.checked_at.lock().unwrap_or_else(|p| p.into_inner());
        let due = at.elapsed() >= BEARER_RECHECK;
        if due {
            *at = Instant::now();
        }
        due
    }

    fn error(&self, reason: impl Into<String>) -> ConsulError {
        ConsulError::Login {
            method: self.settings.auth_method.clone(),
            reason: reason.into(),
        }
    }

    /// The bearer token and the file's modification time.
    fn read_bearer(&self) -> Result<(Secret, Option<SystemTime>), ConsulError> {
        let path = &self.settings.bearer_token_file;
        let hint = "consul.login.bearerTokenFile; in a pod: a projected service account token volume, or the automounted service account token";
        let text = std::fs::read_to_string(path).map_err(|e| {
            self.error(format!(
                "cannot read the bearer token file {}: {e} ({hint})",
                path.display()
            ))
        })?;
        let text = text.trim();
        if text.is_empty() {
            return Err(self.error(format!(
                "the bearer token file {} is empty ({hint})",
                path.display()
            )));
        }
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        Ok((Secret::new(text), modified))
    }

    /// The bearer token file's modification time, when it can be read.
    fn bearer_modified(&self) -> Option<SystemTime> {
        std::fs::metadata(&self.settings.bearer_token_file)
            .and_then(|m| m.modified())
            .ok()
    }

    /// What a refused login means, said so that the user knows what to fix.
    fn refusal(&self, status: u16, body: &str) -> ConsulError {
        let method = &self.settings.auth_method;
        let reason = if status == 403 && body.contains("auth method") && body.contains("not found")
        {
            format!(
                "Consul has no auth method named {method:?}{} (HTTP 403: {body}): create it (docs/acl-login.md), or fix consul.login.authMethod (a consul-k8s install's is <release>-k8s-auth-method)",
                self.scope_note()
            )
        } else if status == 403 {
            format!(
                "no binding rule of the auth method matched this bearer token, so Consul made no token (HTTP 403: {body}): check the binding rules' selector against the token's claims (for a kubernetes method: serviceaccount.name and serviceaccount.namespace), and that the roles or policies they bind exist"
            )
        } else if body.contains("aud") {
            format!(
                "the bearer token's audience is not one the auth method accepts (HTTP {status}: {body}): give the projected service account token the audience the method expects (a kubernetes method: the API server's own, the default; a jwt method: one of its BoundAudiences)"
            )
        } else {
            format!(
                "Consul refused the login (HTTP {status}: {body}); check the auth method's configuration and the bearer token {}",
                self.settings.bearer_token_file.display()
            )
        };
        self.error(reason)
    }

    fn scope_note(&self) -> String {
        match (&self.settings.namespace, &self.settings.partition) {
            (None, None) => String::new(),
            (ns, p) => format!(
                " (namespace {}, partition {})",
                ns.as_deref().unwrap_or("default"),
                p.as_deref().unwrap_or("default")
            ),
        }
    }
}

impl ConsulClient {
    /// Sends one call with the login token, logging in first when there is none. A 403 "ACL not
    /// found" (the token is gone) drops the token, so the next call logs in again, and counts as
    /// a token change: the caller's retry registers its instance again first. Not retried here:
    /// an agent that took a status update under a token Consul no longer knows marks it synced
    /// without syncing it, and a registration identical to its own is then no change to sync.
    pub(super) async fn send_logged_in(
        &self,
        login: &Login,
        operation: &'static str,
        req: reqwest::RequestBuilder,
        timeout: Duration,
    ) -> Result<super::Answer, ConsulError> {
        let token = self.login_token(login).await?;
        let req = req.header("X-Consul-Token", token.expose());
        match self.send_now(operation, req, timeout).await {
            Err(ConsulError::Forbidden { body, .. }) if body.contains("ACL not found") => {
                self.forget_token(login, &token);
                Err(login.error(format!(
                    "{operation}: Consul no longer knows the login token (HTTP 403: {body}: deleted, or expired by the auth method's MaxTokenTTL); the next call logs in again"
                )))
            }
            other => other,
        }
    }

    /// The token to send: the one held, or a new login's. A changed bearer token file means a
    /// new login; the old token keeps working until the next rotation logs it out.
    async fn login_token(&self, login: &Login) -> Result<Secret, ConsulError> {
        if login.closed.load(Ordering::Relaxed) {
            return Err(login.error("logged out after the drain"));
        }
        if let Some(held) = login.held()
            && !login.bearer_due()
        {
            return Ok(held.secret);
        }
        let mut failed = login.flight.lock().await;
        if login.closed.load(Ordering::Relaxed) {
            return Err(login.error("logged out after the drain"));
        }
        match login.held() {
            Some(held) => {
                if login.bearer_modified() == held.modified {
                    return Ok(held.secret);
                }
                let fresh = match login.read_bearer() {
                    Ok((bearer, _)) if bearer == held.bearer => {
                        let mut h = login.held.lock().unwrap_or_else(|p| p.into_inner());
                        if let Some(h) = h.as_mut() {
                            h.modified = login.bearer_modified();
                        }
                        return Ok(held.secret);
                    }
                    Ok(fresh) => fresh,
                    Err(e) => {
                        tracing::warn!(error = %e, "keeping the token of the last login");
                        return Ok(held.secret);
                    }
                };
                match self.login_now(login, fresh).await {
                    Ok(new) => {
                        tracing::info!(
                            auth_method = %login.settings.auth_method,
                            accessor = %new.accessor,
                            "the bearer token file changed: logged in again"
                        );
                        // The old token stays until the next rotation or the logout after
                        // the drain: the agent syncs each instance with the token that
                        // registered it until the instance is registered again.
                        let older = login
                            .previous
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .replace(held);
                        self.replace_token(login, new.clone(), true);
                        if let Some(older) = older {
                            self.logout_token(&older).await;
                        }
                        Ok(new.secret)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the bearer token file changed but the new login failed; keeping the token of the last login");
                        Ok(held.secret)
                    }
                }
            }
            None => {
                if let Some((at, reason)) = failed.as_ref()
                    && at.elapsed() < FAILED_LOGIN_HOLD
                {
                    return Err(login.error(reason.clone()));
                }
                let result = match login.read_bearer() {
                    Ok(bearer) => self.login_now(login, bearer).await,
                    Err(e) => Err(e),
                };
                match result {
                    Ok(new) => {
                        *failed = None;
                        tracing::info!(
                            auth_method = %login.settings.auth_method,
                            accessor = %new.accessor,
                            "logged in to Consul"
                        );
                        self.replace_token(login, new.clone(), false);
                        Ok(new.secret)
                    }
                    Err(e) => {
                        if let ConsulError::Login { reason, .. } = &e {
                            *failed = Some((Instant::now(), reason.clone()));
                        }
                        Err(e)
                    }
                }
            }
        }
    }

    /// Holds `new`. A `rotation` replaces a token that still works: instances registered with
    /// it register again (the agent syncs an instance with the token that registered it).
    fn replace_token(&self, login: &Login, new: Held, rotation: bool) {
        *login.held.lock().unwrap_or_else(|p| p.into_inner()) = Some(new);
        *login.checked_at.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        if rotation {
            self.token.generation.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Drops the token `used` (a call found it gone), unless a newer login replaced it already;
    /// instances registered with it register again.
    fn forget_token(&self, login: &Login, used: &Secret) {
        let mut held = login.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.as_ref().is_some_and(|h| h.secret == *used)
            && let Some(h) = held.take()
        {
            self.token.generation.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                auth_method = %login.settings.auth_method,
                accessor = %h.accessor,
                "Consul no longer knows the login token (ACL not found: deleted, or expired by the auth method's MaxTokenTTL): logging in again"
            );
        }
    }

    /// `POST /v1/acl/login`: a new token for `bearer`.
    async fn login_now(
        &self,
        login: &Login,
        (bearer, modified): (Secret, Option<SystemTime>),
    ) -> Result<Held, ConsulError> {
        let s = &login.settings;
        let body = serde_json::json!({
            "AuthMethod": s.auth_method,
            "BearerToken": bearer.expose(),
            "Meta": s.meta,
        });
        let mut req = self
            .http
            .request(Method::POST, format!("{}/v1/acl/login", self.base))
            .json(&body);
        let ns = s.namespace.as_ref().or(self.scope_value("ns"));
        let partition = s.partition.as_ref().or(self.scope_value("partition"));
        if let Some(ns) = ns {
            req = req.query(&[("ns", ns)]);
        }
        if let Some(p) = partition {
            req = req.query(&[("partition", p)]);
        }
        let answer = match self.send_now("login", req, REQUEST_TIMEOUT).await {
            Ok(a) => a,
            Err(ConsulError::Forbidden { body, .. }) => return Err(login.refusal(403, &body)),
            Err(ConsulError::Status { status, body, .. }) => {
                return Err(login.refusal(status, &body));
            }
            Err(e) => return Err(e),
        };
        #[derive(Deserialize)]
        struct Token {
            #[serde(rename = "SecretID")]
            secret: String,
            #[serde(rename = "AccessorID", default)]
            accessor: String,
        }
        let token: Token =
            serde_json::from_slice(&answer.body).map_err(|e| ConsulError::Decode {
                operation: "login",
                reason: e.to_string(),
            })?;
        Ok(Held {
            secret: Secret::new(token.secret),
            accessor: token.accessor,
            bearer,
            modified,
        })
    }

    fn scope_value(&self, key: &str) -> Option<&String> {
        self.scope.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// `POST /v1/acl/logout` of `held` (best effort: a failure is logged; the token is then
    /// left to the auth method's MaxTokenTTL or an operator).
    async fn logout_token(&self, held: &Held) {
        let req = self
            .http
            .request(Method::POST, format!("{}/v1/acl/logout", self.base))
            .header("X-Consul-Token", held.secret.expose())
            .query(&self.scope[..]);
        match self.send_now("logout", req, LOGOUT_TIMEOUT).await {
            Ok(_) => tracing::info!(accessor = %held.accessor, "logged out of Consul"),
            // Already gone: nothing is left behind.
            Err(ConsulError::Forbidden { body, .. }) if body.contains("ACL not found") => {}
            Err(e) => {
                tracing::warn!(accessor = %held.accessor, error = %e, "the logout failed; the login token stays in Consul until it expires or is deleted")
            }
        }
    }

    /// After the drain: logs out (when logged in with `consul.login`) and logs in no more.
    pub async fn logout(&self) {
        let Some(login) = &self.token.login else {
            return;
        };
        login.closed.store(true, Ordering::Relaxed);
        // A login under way finishes first, so its token is logged out too.
        let _flight = login.flight.lock().await;
        let held = login.held.lock().unwrap_or_else(|p| p.into_inner()).take();
        let previous = login
            .previous
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        for held in [held, previous].into_iter().flatten() {
            self.logout_token(&held).await;
        }
    }
}
