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
