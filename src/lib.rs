//! consul-registrar: keeps an application's Consul registration in step with its gRPC health.
//!
//! The data flows manifest → probe → reconcile → consul; `admin`, `metrics` and `shutdown` sit beside
//! that path. See ARCHITECTURE.md for the map and the invariants.

pub mod manifest;
