//! consul-registrar: keeps an application's Consul registration in step with its gRPC health.
//!
//! The data flows manifest → probe → reconcile → consul; `admin`, `metrics` and `shutdown` sit beside
//! that path. See ARCHITECTURE.md for the map and the invariants.

pub mod admin;
pub mod consul;
pub mod heal;
pub mod manifest;
pub mod metrics;
pub mod probe;
pub mod reconcile;
pub mod shutdown;
pub mod sidecar;
pub mod status;

/// An error and its sources on one line, each text once ("transport error: Connection refused (os
/// error 111)"): tonic's and reqwest's top-level messages alone say little. Used wherever an error
/// from the network reaches a log line, `/status` or the `probe` command's output.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}
