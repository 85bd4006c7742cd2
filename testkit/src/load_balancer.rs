//! A TCP load balancer on a loopback port in front of several backends, as a Kubernetes Service
//! puts one address in front of the Consul servers: each new connection goes to the next backend in
//! turn (backends that refuse are skipped), and lives and dies with that backend — when the backend
//! resets or goes away, the client's connection is reset too.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::free_port;

/// A round-robin TCP proxy on `127.0.0.1:<free port>`. Dropping it closes the listener and every
/// proxied connection.
pub struct LoadBalancer {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl LoadBalancer {
    /// Listens on a free loopback port in front of `backends` (tried in turn per connection).
    pub async fn start(backends: Vec<SocketAddr>) -> LoadBalancer {
        assert!(!backends.is_empty(), "a load balancer needs backends");
        let listener = loop {
            // free_port() checks the port is free; another process may still take it first.
            if let Ok(l) = TcpListener::bind(("127.0.0.1", free_port())).await {
                break l;
            }
        };
        let addr = listener.local_addr().expect("local address");
        let connections = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(serve(listener, backends, Arc::clone(&connections)));
        LoadBalancer {
            addr,
            connections,
            task,
        }
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, for a Consul address in a manifest.
    pub fn http_addr(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many client connections were proxied to a backend so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for LoadBalancer {
    fn drop(&mut self) {
        // Dropping the accept task drops its JoinSet, which aborts every proxied connection.
        self.task.abort();
    }
}

async fn serve(listener: TcpListener, backends: Vec<SocketAddr>, connections: Arc<AtomicUsize>) {
    let mut next = 0usize;
    let mut proxied = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                let start = next;
                next = next.wrapping_add(1);
                let order: Vec<SocketAddr> = (0..backends.len())
                    .map(|k| backends[(start + k) % backends.len()])
                    .collect();
                let connections = Arc::clone(&connections);
                proxied.spawn(async move {
                    if let Some(backend) = connect_first(&order).await {
                        connections.fetch_add(1, Ordering::SeqCst);
                        proxy(client, backend).await;
                    } else {
                        reset(client);
                    }
                });
            }
            Some(_) = proxied.join_next(), if !proxied.is_empty() => {}
        }
    }
}

/// The first backend in `order` that accepts a connection within a second.
async fn connect_first(order: &[SocketAddr]) -> Option<TcpStream> {
    for addr in order {
        if let Ok(Ok(stream)) =
            tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await
        {
            let _ = stream.set_nodelay(true);
            return Some(stream);
        }
    }
    None
}

/// Copies both ways until both sides are done; an error on either side (a backend that was
/// killed, a reset) resets the client's connection.
async fn proxy(mut client: TcpStream, mut backend: TcpStream) {
    let _ = client.set_nodelay(true);
    if tokio::io::copy_bidirectional(&mut client, &mut backend)
        .await
        .is_err()
    {
        reset(client);
    }
}

/// Closes `stream` with a reset (SO_LINGER 0) instead of an orderly FIN.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
}
