//! The integration tests' harness is the `testkit` crate of this workspace (`testkit/`), shared
//! with the pod simulation and the benchmark. This module only re-exports it, so that a test keeps
//! writing `mod support;` and `support::ConsulAgent`, `support::sidecar::Sidecar`,
//! `support::podsim::Pod`, ...
#![allow(unused_imports)]

pub use testkit::*;
