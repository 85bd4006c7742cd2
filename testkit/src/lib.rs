//! consul-registrar's test kit, shared by the integration tests (through `tests/support`), the pod
//! simulation and the benchmark (`examples/bench.rs`): real Consul agents on free loopback ports
//! (optionally with ACLs or HTTPS only, or as a client agent joined to a server), a three-server
//! cluster with no client agent behind a round-robin TCP load balancer, a proxy that freezes Consul
//! on demand ([`Valve`]), the real demo
//! gRPC app, the real sidecar binary, the tutorial's Go peers and pods on network namespaces
//! (`podsim`). Every process is killed on drop; a failing test prints the logs.
//!
//! The binaries are never built from here: `make unit-and-integration` and `make podsim` build
//! them once before the tests (see [`registrar_bin`] and [`demo_app_bin`]).

mod bins;
mod consul;
mod consul_cluster;
mod demo_app;
mod load_balancer;
mod metrics;
mod ports;
mod process;
mod valve;
mod wait;

/// Pods on network namespaces: an app and the sidecar sharing a pod IP, a kubelet's termination.
pub mod jwt;
pub mod podsim;
/// The real `consul-registrar` binary as a child process.
pub mod sidecar;

pub use bins::{consul_bin, demo_app_bin, go_peers, registrar_bin, use_binaries, workspace_root};
pub use consul::{
    CONSUL_LISTENERS_OFF, ConsulAgent, ConsulOptions, MANAGEMENT_TOKEN, REGISTRAR_RULES,
    REGISTRAR_TOKEN, instance_status,
};
pub use consul_cluster::ConsulCluster;
pub use demo_app::{DemoApp, DemoAppOptions};
pub use load_balancer::LoadBalancer;
pub use metrics::Metrics;
pub use ports::free_port;
pub use process::{Proc, signal_pid};
pub use sidecar::{CONSUL_ENV, Sidecar, SidecarOptions};
pub use valve::Valve;
pub use wait::{http_client, tail, wait_until};
