//! A TCP proxy on a loopback port in front of one backend (a Consul agent or server) that can be
//! shut like a valve. Shut, it still accepts connections but forwards nothing on them nor on the
//! connections it was carrying, which stay open and silent: a Consul that froze (a SIGSTOPped
//! agent, a path that drops packets), where every call hangs until the caller's own timeout.
//! Opened again, it resets the connections it held (the client connects anew) and forwards as
//! before. It counts the connections it carried, and it can also hold back the requests that contain a given text for a while (a slow
//! answer to one kind of call), counting them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::free_port;

/// Requests held back: those whose bytes contain `text` wait `hold` before they are forwarded.
#[derive(Clone, Default)]
struct HoldBack {
    text: Option<(&'static str, Duration)>,
}

/// The proxy; dropping it closes the listener and every connection it carries.
pub struct Valve {
    addr: SocketAddr,
    shut: Arc<watch::Sender<bool>>,
    hold_back: Arc<std::sync::Mutex<HoldBack>>,
    held_back: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Valve {
    /// Listens on a free loopback port, open, in front of `backend`.
    pub async fn start(backend: SocketAddr) -> Valve {
        let listener = loop {
            if let Ok(l) = TcpListener::bind(("127.0.0.1", free_port())).await {
                break l;
            }
        };
        let addr = listener.local_addr().expect("local address");
        let shut = Arc::new(watch::Sender::new(false));
        let hold_back = Arc::new(std::sync::Mutex::new(HoldBack::default()));
        let held_back = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(serve(
            listener,
            backend,
            Arc::clone(&shut),
            Arc::clone(&hold_back),
            Arc::clone(&held_back),
            Arc::clone(&connections),
        ));
        Valve {
            addr,
            shut,
            hold_back,
            held_back,
            connections,
            task,
        }
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// How many connections were carried to the backend so far (refused ones not counted).
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// `http://127.0.0.1:PORT`, for a Consul address in a manifest.
    pub fn http_addr(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Shuts the valve: nothing is forwarded any more, every connection hangs.
    pub fn shut(&self) {
        self.shut.send_replace(true);
    }

    /// Opens it again: the held connections are reset, new ones forwarded.
    pub fn open(&self) {
        self.shut.send_replace(false);
    }

    /// From now on, a request whose bytes contain `text` is forwarded only `hold` after it came.
    pub fn hold_back(&self, text: &'static str, hold: Duration) {
        self.hold_back
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .text = Some((text, hold));
    }

    /// How many requests were held back so far (counted when they arrive).
    pub fn held_back(&self) -> usize {
        self.held_back.load(Ordering::SeqCst)
    }
}

impl Drop for Valve {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    listener: TcpListener,
    backend: SocketAddr,
    shut: Arc<watch::Sender<bool>>,
    hold_back: Arc<std::sync::Mutex<HoldBack>>,
    held_back: Arc<AtomicUsize>,
    carried: Arc<AtomicUsize>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                let shut = shut.subscribe();
                let hold_back = Arc::clone(&hold_back);
                let held_back = Arc::clone(&held_back);
                let carried = Arc::clone(&carried);
                connections.spawn(carry(client, backend, shut, hold_back, held_back, carried));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// One client connection: forwarded while the valve is open; once it shuts, held silent until it
/// opens, then reset.
async fn carry(
    client: TcpStream,
    backend: SocketAddr,
    mut shut: watch::Receiver<bool>,
    hold_back: Arc<std::sync::Mutex<HoldBack>>,
    held_back: Arc<AtomicUsize>,
    carried: Arc<AtomicUsize>,
) {
    let _ = client.set_nodelay(true);
    if *shut.borrow_and_update() {
        // Accepted while shut: held open and silent, reset once the valve opens.
        let _ = shut.wait_for(|s| !*s).await;
        let _ = client.set_zero_linger();
        return;
    }
    let Ok(server) = TcpStream::connect(backend).await else {
        let _ = client.set_zero_linger();
        return;
    };
    let _ = server.set_nodelay(true);
    carried.fetch_add(1, Ordering::SeqCst);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let (up, down) = tokio::join!(
        forward(
            client_read,
            server_write,
            shut.clone(),
            Some((hold_back, held_back))
        ),
        forward(server_read, client_write, shut.clone(), None),
    );
    // Shut while carrying: both sockets stay open, silent, until the valve opens; then reset.
    if let (Ended::Shut(client_read, server_write), Ended::Shut(server_read, client_write)) =
        (up, down)
    {
        let _ = shut.wait_for(|s| !*s).await;
        if let Ok(client) = client_read.reunite(client_write) {
            let _ = client.set_zero_linger();
        }
        drop((server_read, server_write));
    }
}

/// How a direction of a carried connection ended.
enum Ended {
    /// The sender closed it, or it failed.
    Closed,
    /// The valve shut: the halves, untouched since.
    Shut(OwnedReadHalf, OwnedWriteHalf),
}

/// Copies one direction until it ends or the valve shuts; requests containing the held-back text
/// wait first.
async fn forward(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut shut: watch::Receiver<bool>,
    hold: Option<(Arc<std::sync::Mutex<HoldBack>>, Arc<AtomicUsize>)>,
) -> Ended {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let read = tokio::select! {
            _ = shut.wait_for(|s| *s) => None,
            r = from.read(&mut buf) => Some(r),
        };
        let n = match read {
            None => return Ended::Shut(from, to),
            Some(Ok(0) | Err(_)) => break,
            Some(Ok(n)) => n,
        };
        if let Some((hold_back, held_back)) = &hold {
            let rule = hold_back.lock().unwrap_or_else(|p| p.into_inner()).text;
            if let Some((text, wait)) = rule
                && String::from_utf8_lossy(&buf[..n]).contains(text)
            {
                held_back.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(wait).await;
            }
        }
        if *shut.borrow() {
            return Ended::Shut(from, to);
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
    Ended::Closed
}
