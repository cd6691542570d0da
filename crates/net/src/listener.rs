//! Accepting connections within a global and a per-client-address cap.
//!
//! Every listener of the controller (NBD, iSCSI, the REST API) accepts through a
//! [`Listener`]. A connection is counted the moment it is accepted, before anything runs
//! for it, and its [`Admitted`] guard travels with it (into its thread or task) and gives
//! the place back when dropped. So the caps hold exactly however fast clients connect, and
//! one client address (an IPv6 client: its /64) cannot take the places of all others.
//!
//! ```text
//!   accept() ──▶ admit(peer address) ──refused──▶ close at once (warning, at most once a second)
//!                     │ admitted: counted now
//!                     ▼
//!   thread or task ─ serve(stream) ─ drop(Admitted): counted out
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

/// How many connections a listener serves at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    /// Most connections open at once, from all clients together.
    pub total: usize,
    /// Most connections open at once from one client address.
    pub per_address: usize,
}

impl Caps {
    /// Default total: each NBD and iSCSI connection has a thread of its own.
    pub const TOTAL: usize = 1024;
    /// Default per address: a host rarely needs more, and 16 busy addresses still fit.
    pub const PER_ADDRESS: usize = 64;
}

impl Default for Caps {
    fn default() -> Self {
        Self { total: Self::TOTAL, per_address: Self::PER_ADDRESS }
    }
}

/// Why a connection was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Every place is taken.
    #[error("The listener already serves its limit of {0} connections")]
    Total(usize),
    /// The client's address has all the places one address may have.
    #[error("The client's address already has its limit of {0} connections")]
    PerAddress(usize),
}

/// Connections a listener has refused since it started, by the cap they were over.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Refused {
    /// Refused because every place was taken.
    pub total: u64,
    /// Refused because their client address had all its places.
    pub per_address: u64,
}

/// The connections a listener has admitted and not yet seen closed, by client address,
/// and how many it refused (for the controller's metrics).
#[derive(Debug)]
pub struct Open {
    caps: Caps,
    counts: Mutex<Counts>,
    refused_total: AtomicU64,
    refused_per_address: AtomicU64,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

impl Open {
    /// Nothing open yet, within `caps`.
    pub fn new(caps: Caps) -> Arc<Self> {
        Arc::new(Self {
            caps,
            counts: Mutex::default(),
            refused_total: AtomicU64::new(0),
            refused_per_address: AtomicU64::new(0),
        })
    }

    /// Connections refused so far, by cap: what an operator watches to see the caps at work.
    pub fn refused(&self) -> Refused {
        Refused {
            total: self.refused_total.load(Ordering::Relaxed),
            per_address: self.refused_per_address.load(Ordering::Relaxed),
        }
    }

    /// The caps this count enforces.
    pub fn caps(&self) -> Caps {
        self.caps
    }

    /// Connections open now.
    pub fn total(&self) -> usize {
        self.counts().total
    }

    /// Connections open now from `address` (from its /64 for IPv6).
    pub fn from_address(&self, address: IpAddr) -> usize {
        self.counts().by_address.get(&client(address)).copied().unwrap_or(0)
    }

    /// Counts a connection from `address` if the caps allow it; the guard counts it out.
    pub fn admit(self: &Arc<Self>, address: IpAddr) -> Result<Admitted, Refusal> {
        let address = client(address);
        let mut counts = self.counts();
        if counts.total >= self.caps.total {
            self.refused_total.fetch_add(1, Ordering::Relaxed);
            return Err(Refusal::Total(self.caps.total));
        }
        let from_address = counts.by_address.entry(address).or_insert(0);
        if *from_address >= self.caps.per_address {
            self.refused_per_address.fetch_add(1, Ordering::Relaxed);
            return Err(Refusal::PerAddress(self.caps.per_address));
        }
        *from_address += 1;
        counts.total += 1;
        Ok(Admitted { open: self.clone(), address })
    }

    fn counts(&self) -> MutexGuard<'_, Counts> {
        // The counts stay consistent even if a holder panicked: every change is one step.
        self.counts.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The address a client is counted under: an IPv4 address as itself (also when mapped
/// into IPv6), an IPv6 address by its /64, since one host or site is routinely given a
/// whole /64 and could otherwise open a cap's worth of connections from each address.
fn client(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        },
    }
}

/// One admitted connection's place; dropping it frees the place.
#[must_use = "the connection is counted out as soon as its place is dropped"]
#[derive(Debug)]
pub struct Admitted {
    open: Arc<Open>,
    address: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut counts = self.open.counts();
        counts.total -= 1;
        if let Some(n) = counts.by_address.get_mut(&self.address) {
            *n -= 1;
            if *n == 0 {
                counts.by_address.remove(&self.address);
            }
        }
    }
}

/// A TCP listener that admits connections within [`Caps`] and closes the others at once.
#[derive(Debug)]
pub struct Listener {
    socket: TcpListener,
    protocol: &'static str,
    open: Arc<Open>,
    refusals: Mutex<Refusals>,
}

/// Refusals since the last warning, so a flood logs a line a second, not a line a
/// connection.
#[derive(Debug)]
struct Refusals {
    last_warning: Option<Instant>,
    unreported: u64,
}

/// How long an accept error (out of file descriptors, say) pauses accepting.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Least time between two warnings about refused connections.
const WARNING_INTERVAL: Duration = Duration::from_secs(1);

impl Listener {
    /// Accepts `protocol` connections (the name is for log lines) on `socket` within `caps`.
    pub fn new(socket: TcpListener, protocol: &'static str, caps: Caps) -> Self {
        Self {
            socket,
            protocol,
            open: Open::new(caps),
            refusals: Mutex::new(Refusals { last_warning: None, unreported: 0 }),
        }
    }

    /// The address the socket listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// The connections admitted and still open (shared: it outlives the listener while
    /// connections do).
    pub fn open(&self) -> Arc<Open> {
        self.open.clone()
    }

    /// The next connection the caps admit, counted before it is returned. Connections
    /// over a cap are closed here; accept errors pause briefly and are retried, so this
    /// only returns a connection. Cancel-safe.
    pub async fn accept(&self) -> (TcpStream, SocketAddr, Admitted) {
        loop {
            match self.socket.accept().await {
                Ok((stream, peer)) => match self.open.admit(peer.ip()) {
                    Ok(admitted) => return (stream, peer, admitted),
                    Err(refusal) => {
                        drop(stream);
                        self.refused(peer, refusal);
                    }
                },
                Err(e) => {
                    tracing::warn!(protocol = self.protocol, error = %e, "accepting a connection failed; retrying");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    }

    fn refused(&self, peer: SocketAddr, refusal: Refusal) {
        let mut refusals = self.refusals.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        refusals.unreported += 1;
        let now = Instant::now();
        if refusals.last_warning.is_none_or(|last| now.duration_since(last) >= WARNING_INTERVAL) {
            tracing::warn!(
                protocol = self.protocol,
                %peer,
                refused = refusals.unreported,
                "{refusal}; closing new connections over it"
            );
            refusals.last_warning = Some(now);
            refusals.unreported = 0;
        }
    }

    /// Accepts until `shutdown` turns true and serves each connection on a thread of its
    /// own with a single-threaded runtime, so a request, its IO and its reply never wait
    /// for a wake-up on another CPU and connections spread over the cores. Then waits until
    /// every connection's `serve` has returned. The connection's place is held until then.
    pub async fn serve_on_threads<F, Fut>(self, mut shutdown: watch::Receiver<bool>, serve: F)
    where
        F: Fn(TcpStream, SocketAddr) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = ()>,
    {
        let tracker = TaskTracker::new();
        loop {
            tokio::select! {
                (stream, peer, admitted) = self.accept() => {
                    let _ = stream.set_nodelay(true);
                    if let Err(e) = self.start_thread(&tracker, stream, peer, admitted, serve.clone()) {
                        tracing::warn!(protocol = self.protocol, %peer, error = %e, "cannot start a thread for a connection");
                    }
                }
                () = stopped(&mut shutdown) => break,
            }
        }
        drop(self);
        tracker.close();
        tracker.wait().await;
    }

    fn start_thread<F, Fut>(
        &self,
        tracker: &TaskTracker,
        stream: TcpStream,
        peer: SocketAddr,
        admitted: Admitted,
        serve: F,
    ) -> std::io::Result<()>
    where
        F: FnOnce(TcpStream, SocketAddr) -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        let stream = stream.into_std()?;
        let token = tracker.token();
        let protocol = self.protocol;
        std::thread::Builder::new().name(format!("{} {peer}", protocol.to_lowercase())).spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
            match runtime {
                Ok(runtime) => runtime.block_on(async {
                    match TcpStream::from_std(stream) {
                        Ok(stream) => serve(stream, peer).await,
                        Err(e) => tracing::warn!(protocol, %peer, error = %e, "cannot adopt a connection"),
                    }
                }),
                Err(e) => {
                    tracing::warn!(protocol, %peer, error = %e, "cannot start a runtime for a connection")
                }
            }
            drop(admitted);
            drop(token);
        })?;
        Ok(())
    }
}

/// Returns once `shutdown` turns true (or its sender is gone).
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await.map(|_| ());
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::AsyncReadExt;
    use tokio::net::TcpSocket;

    use super::*;

    async fn listener(caps: Caps) -> (Listener, SocketAddr) {
        let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        (Listener::new(socket, "test", caps), addr)
    }

    /// A client connection from `source` (any address of 127/8 routes to loopback).
    async fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        socket.connect(to).await.unwrap()
    }

    /// True when the server closed `client` (it reads end of stream or a reset).
    async fn closed(client: &mut TcpStream) -> bool {
        let mut byte = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(300), client.read(&mut byte)).await {
            Ok(Ok(0)) | Ok(Err(_)) => true,
            Ok(Ok(_)) | Err(_) => false,
        }
    }

    #[test]
    fn caps_count_per_address_and_in_total() {
        let open = Open::new(Caps { total: 3, per_address: 2 });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = open.admit(a).unwrap();
        let _a2 = open.admit(a).unwrap();
        assert_eq!(open.admit(a).unwrap_err(), Refusal::PerAddress(2));
        let _b1 = open.admit(b).unwrap();
        assert_eq!(open.admit(b).unwrap_err(), Refusal::Total(3));
        assert_eq!((open.total(), open.from_address(a), open.from_address(b)), (3, 2, 1));
        drop(a1);
        assert_eq!((open.total(), open.from_address(a)), (2, 1));
        let _b2 = open.admit(b).unwrap();
        assert_eq!(open.admit(a).unwrap_err(), Refusal::Total(3));
        assert_eq!(open.refused(), Refused { total: 2, per_address: 1 }, "each refusal counted by its cap");
    }

    #[test]
    fn an_ipv6_client_is_counted_by_its_64_and_mapped_ipv4_as_ipv4() {
        let open = Open::new(Caps { total: 10, per_address: 2 });
        let _one = open.admit("2001:db8:1:2::1".parse().unwrap()).unwrap();
        let _two = open.admit("2001:db8:1:2:ffff::9".parse().unwrap()).unwrap();
        assert_eq!(open.admit("2001:db8:1:2::3".parse().unwrap()).unwrap_err(), Refusal::PerAddress(2));
        let _other = open.admit("2001:db8:1:3::1".parse().unwrap()).unwrap();
        let _v4 = open.admit("192.0.2.1".parse().unwrap()).unwrap();
        let _mapped = open.admit("::ffff:192.0.2.1".parse().unwrap()).unwrap();
        assert_eq!(open.from_address("192.0.2.1".parse().unwrap()), 2);
        assert_eq!(open.admit("::ffff:192.0.2.1".parse().unwrap()).unwrap_err(), Refusal::PerAddress(2));
    }

    /// The count moves when a connection is accepted, not when something later runs for
    /// it: connections accepted in a burst, before any of them is served, are still capped.
    #[tokio::test]
    async fn a_connection_is_counted_when_accepted() {
        let (listener, addr) = listener(Caps { total: 10, per_address: 2 }).await;
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(connect_from("127.0.0.1", addr).await);
        }
        let (_s1, _, first) = listener.accept().await;
        let (_s2, _, _second) = listener.accept().await;
        assert_eq!(listener.open().total(), 2, "counted at accept, before anything serves them");
        // The third is closed by the next accept; a client from another address gets in.
        let mut other = connect_from("127.0.0.2", addr).await;
        let (_s3, peer, _third) = listener.accept().await;
        assert_eq!(peer.ip(), "127.0.0.2".parse::<IpAddr>().unwrap());
        assert!(closed(&mut clients[2]).await, "the connection over the per-address cap is closed");
        assert!(!closed(&mut other).await && !closed(&mut clients[0]).await);
        // A freed place is taken again.
        drop(first);
        let _again = connect_from("127.0.0.1", addr).await;
        let (_s4, peer, _fourth) = listener.accept().await;
        assert_eq!(peer.ip(), "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!((listener.open().total(), listener.open().from_address(peer.ip())), (3, 2));
    }

    /// Connections on threads hold their place until `serve` returns; shutdown waits for
    /// them, and the total cap holds across addresses.
    #[tokio::test]
    async fn threads_hold_their_place_until_served() {
        let (listener, addr) = listener(Caps { total: 2, per_address: 2 }).await;
        let open = listener.open();
        let served = Arc::new(AtomicUsize::new(0));
        let (stop, shutdown) = watch::channel(false);
        let counter = served.clone();
        let run = tokio::spawn(listener.serve_on_threads(shutdown.clone(), move |mut stream, _| {
            let counter = counter.clone();
            let mut shutdown = shutdown.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                let mut buf = [0u8; 1];
                // Served until the client hangs up or the server stops.
                tokio::select! {
                    _ = stream.read(&mut buf) => {}
                    () = stopped(&mut shutdown) => {}
                }
            }
        }));
        let mut a = connect_from("127.0.0.1", addr).await;
        let mut b = connect_from("127.0.0.2", addr).await;
        let mut c = connect_from("127.0.0.3", addr).await;
        assert!(closed(&mut c).await, "over the total cap");
        assert!(!closed(&mut a).await && !closed(&mut b).await);
        assert_eq!(open.total(), 2);
        drop(a);
        let deadline = Instant::now() + Duration::from_secs(5);
        while open.total() != 1 {
            assert!(Instant::now() < deadline, "a closed connection's place is given back");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut d = connect_from("127.0.0.3", addr).await;
        assert!(!closed(&mut d).await, "a freed place is taken");
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), run).await.unwrap().unwrap();
        assert_eq!((open.total(), served.load(Ordering::SeqCst)), (0, 3));
    }
}
