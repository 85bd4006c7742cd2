//! Free loopback ports for the processes a test starts.

use std::net::{TcpListener, UdpSocket};
use std::sync::atomic::{AtomicU32, Ordering};

/// A TCP port on 127.0.0.1 that is free (for TCP and UDP) when asked. Ports come from below
/// Linux's ephemeral range (32768+), so that no outgoing connection of a test process can take one
/// between this call and the bind; a per-process counter from a random start keeps parallel tests
/// and processes apart.
pub fn free_port() -> u16 {
    const LOW: u32 = 12_000;
    const HIGH: u32 = 32_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        fastrand::u32(..(HIGH - LOW)),
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..(HIGH - LOW) {
        let offset = NEXT.fetch_add(1, Ordering::SeqCst) % (HIGH - LOW);
        let port = (LOW + offset) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && UdpSocket::bind(("127.0.0.1", port)).is_ok()
        {
            return port;
        }
    }
    panic!("no free port between {LOW} and {HIGH}")
}
