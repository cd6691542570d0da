//! Any bytes from an NBD client, whole sessions at a time (handshake, options, requests):
//! the server answers or hangs up, never panics or hangs, and the export stays usable.
#![no_main]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use strata_block::{BlockIo, MemDevice};
use strata_nbd::{Export, Exports, NbdServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct One(Export);

impl Exports for One {
    fn lookup(&self, name: &str, _: std::net::IpAddr) -> Option<Export> {
        (name.is_empty() || name == self.0.name).then(|| self.0.clone())
    }
    fn list(&self, _: std::net::IpAddr) -> Vec<Export> {
        vec![self.0.clone()]
    }
}

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let device: Arc<dyn BlockIo> = MemDevice::new("fuzz", 1 << 20, 4096);
        let export = Export { name: "f".into(), description: String::new(), device, read_only: false };
        let server = NbdServer::new(Arc::new(One(export)));
        let (client, served) = tokio::io::duplex(1 << 16);
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let session = server.connection(served, peer, shutdown);
        let talk = async move {
            let (mut rx, mut tx) = tokio::io::split(client);
            let send = async move {
                let _ = tx.write_all(data).await;
                let _ = tx.shutdown().await;
            };
            let drain = async move {
                let mut sink = Vec::new();
                let _ = rx.read_to_end(&mut sink).await;
            };
            tokio::join!(send, drain);
        };
        let done = tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(session, talk) }).await;
        assert!(done.is_ok(), "the session hung");
    });
});
