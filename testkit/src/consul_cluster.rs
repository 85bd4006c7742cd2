//! A Consul cluster of three servers on loopback ports and no client agent: what a default
//! consul-k8s install gives a pod since 1.0. Each server is a [`ConsulAgent`] (the same options,
//! spawn and read helpers) in server mode with a data directory of its own; servers can be killed,
//! restarted and the whole cluster wiped.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::{ConsulAgent, ConsulOptions, tail};

/// How long a start, a restart or a wipe may take to produce a leader every server knows.
const ELECTION_TIMEOUT: Duration = Duration::from_secs(60);

/// Three Consul servers (`-server -bootstrap-expect=3`, each `-retry-join`ing the others) on
/// 127.0.0.1, fast Raft (`raft_multiplier = 1`), no keyring file, no DNS or gRPC listener.
/// Dropping it kills every server.
pub struct ConsulCluster {
    servers: Vec<ConsulAgent>,
}

impl ConsulCluster {
    /// Starts three servers and waits until they have elected a leader and all three know it.
    pub async fn start() -> ConsulCluster {
        Self::start_with(ConsulOptions {
            log_level: Some("debug"),
            ..ConsulOptions::default()
        })
        .await
    }

    /// [`start`](Self::start) with every server's options (the benchmark's: INFO logging and a
    /// raised per-client connection limit, since all its sidecars connect from 127.0.0.1).
    pub async fn start_with(opts: ConsulOptions) -> ConsulCluster {
        let mut servers: Vec<ConsulAgent> = (0..3).map(|_| ConsulAgent::prepare(opts)).collect();
        let lan: Vec<u16> = servers.iter().map(ConsulAgent::serf_lan_port).collect();
        for (i, server) in servers.iter_mut().enumerate() {
            let peers = lan
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, p)| *p)
                .collect();
            server.join_cluster(peers);
        }
        let mut cluster = ConsulCluster { servers };
        for server in &mut cluster.servers {
            server.spawn();
        }
        cluster.wait_for_leader(ELECTION_TIMEOUT).await;
        cluster
    }

    /// The servers' HTTP base URLs (`http://127.0.0.1:PORT`), in server order.
    pub fn http_addrs(&self) -> Vec<String> {
        self.servers.iter().map(ConsulAgent::http_addr).collect()
    }

    /// The servers' HTTP socket addresses, for a [`LoadBalancer`](crate::LoadBalancer) in front.
    pub fn http_socket_addrs(&self) -> Vec<SocketAddr> {
        self.servers
            .iter()
            .map(|s| SocketAddr::from(([127, 0, 0, 1], s.http_port())))
            .collect()
    }

    /// Server `i` (0, 1 or 2), running or not.
    pub fn server(&self, i: usize) -> &ConsulAgent {
        &self.servers[i]
    }

    /// A running server, for reads and writes through the HTTP API (every server forwards to the
    /// leader, so any running one answers like the cluster). Panics when none runs.
    pub fn api(&self) -> &ConsulAgent {
        self.servers
            .iter()
            .find(|s| s.is_running())
            .expect("no Consul server is running")
    }

    /// The index of the leader as server `from` sees it (`/v1/status/leader` names it by its Raft
    /// address), None without a leader or an answer.
    async fn leader_seen_by(&self, from: usize) -> Option<usize> {
        let leader = self.servers[from].leader().await?;
        self.servers
            .iter()
            .position(|s| leader.ends_with(&format!(":{}", s.server_port())))
    }

    /// The index of the leader if every running server names the same one, else None.
    pub async fn leader(&self) -> Option<usize> {
        let mut agreed = None;
        for (i, _) in self
            .servers
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_running())
        {
            let seen = self.leader_seen_by(i).await?;
            if agreed.is_some_and(|l| l != seen) || !self.servers[seen].is_running() {
                return None;
            }
            agreed = Some(seen);
        }
        agreed
    }

    /// Waits up to `timeout` until every running server names the same running leader; its index.
    /// Panics (with the servers' logs) if none comes or a server exits.
    pub async fn wait_for_leader(&mut self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            for server in &mut self.servers {
                if let Some(status) = server.exited() {
                    panic!(
                        "consul server exited with {status}:\n{}",
                        tail(&server.log_path(), 60)
                    );
                }
            }
            if let Some(leader) = self.leader().await {
                return leader;
            }
            if Instant::now() >= deadline {
                let logs: Vec<String> = self
                    .servers
                    .iter()
                    .map(|s| tail(&s.log_path(), 30))
                    .collect();
                panic!(
                    "the cluster has no leader after {timeout:?}:\n{}",
                    logs.join("\n-----\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The server a client agent sends its RPCs to (the one it holds a connection to on its server
    /// RPC port), if exactly one.
    pub fn rpc_server_of(&self, client: &ConsulAgent) -> Option<usize> {
        let ports = client.connected_ports();
        let mut found = self
            .servers
            .iter()
            .enumerate()
            .filter(|(_, s)| ports.contains(&s.server_port()))
            .map(|(i, _)| i);
        let first = found.next()?;
        found.next().is_none().then_some(first)
    }

    /// Makes server `to` the leader (`POST /v1/operator/raft/transfer-leader?id=`) and waits until
    /// every running server names it.
    pub async fn transfer_leadership(&mut self, to: usize) {
        let deadline = Instant::now() + ELECTION_TIMEOUT;
        loop {
            if self.leader().await == Some(to) {
                return;
            }
            let (_, configuration) = self
                .api()
                .get("/v1/operator/raft/configuration")
                .await
                .expect("raft configuration");
            let suffix = format!(":{}", self.servers[to].server_port());
            let id = configuration["Servers"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|s| s["Address"].as_str().is_some_and(|a| a.ends_with(&suffix)))
                .and_then(|s| s["ID"].as_str())
                .map(str::to_string);
            if let Some(id) = id {
                let _ = self
                    .api()
                    .client()
                    .post(format!(
                        "{}/v1/operator/raft/transfer-leader?id={id}",
                        self.api().http_addr()
                    ))
                    .send()
                    .await;
            }
            assert!(
                Instant::now() < deadline,
                "server {to} did not become the leader"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Kills server `i` (SIGKILL); its ports and data directory stay for [`restart`](Self::restart).
    pub fn kill(&mut self, i: usize) {
        self.servers[i].stop();
    }

    /// Kills the current leader (SIGKILL) once there is one; its index.
    pub async fn kill_leader(&mut self) -> usize {
        let leader = self.wait_for_leader(ELECTION_TIMEOUT).await;
        self.kill(leader);
        leader
    }

    /// Starts server `i` again with its data and waits until every running server knows one leader.
    pub async fn restart(&mut self, i: usize) {
        assert!(!self.servers[i].is_running(), "server {i} is running");
        self.servers[i].spawn();
        self.wait_for_leader(ELECTION_TIMEOUT).await;
    }

    /// Loses every server's state: stops all, empties their data directories, starts them again on
    /// the same ports and waits for a leader (as if the servers were restored to nothing).
    pub async fn wipe(&mut self) {
        for server in &mut self.servers {
            server.stop();
            let data = server.data_dir();
            if data.exists() {
                std::fs::remove_dir_all(&data).expect("empty the data directory");
            }
        }
        for server in &mut self.servers {
            server.spawn();
        }
        self.wait_for_leader(ELECTION_TIMEOUT).await;
    }
}
