//! The sessions a server has open, by initiator, ISID and target: a login with the ISID of
//! a live session reinstates it (the old connection is closed and its commands finish
//! first), and a TARGET COLD RESET closes every session of its target.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;

/// How long a reinstating login waits for the old session's commands to finish.
const REINSTATE_WAIT: Duration = Duration::from_secs(30);

/// What identifies a session across logins (RFC 7143 §4.4.3: initiator name, ISID and
/// target portal group of the target).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SessionKey {
    /// Initiator IQN.
    pub initiator: String,
    /// Initiator session ID.
    pub isid: [u8; 6],
    /// Target IQN.
    pub target: String,
}

struct Entry {
    key: SessionKey,
    stop: watch::Sender<bool>,
    ended: watch::Receiver<()>,
}

/// Open normal sessions.
#[derive(Default)]
pub struct Sessions {
    open: Mutex<HashMap<u64, Entry>>,
    next_id: AtomicU64,
    next_tsih: AtomicU16,
}

/// A live session's registration; dropping it ends the session's entry.
pub struct SessionHandle {
    sessions: Arc<Sessions>,
    id: u64,
    /// Turns true when the session must end (reinstated or target cold reset).
    pub stop: watch::Receiver<bool>,
    _ended: watch::Sender<()>,
}

impl Drop for SessionHandle {
    fn drop(&mut self) {
        self.sessions.open.lock().remove(&self.id);
    }
}

impl Sessions {
    /// A session handle for a new login, never 0.
    pub fn next_tsih(&self) -> u16 {
        loop {
            let tsih = self.next_tsih.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
            if tsih != 0 {
                return tsih;
            }
        }
    }

    /// Registers a session, first closing and waiting out any session with the same key.
    pub async fn open(self: &Arc<Self>, key: SessionKey) -> SessionHandle {
        let old: Vec<watch::Receiver<()>> = {
            let open = self.open.lock();
            open.values()
                .filter(|e| e.key == key)
                .map(|e| {
                    let _ = e.stop.send(true);
                    e.ended.clone()
                })
                .collect()
        };
        for mut ended in old {
            tracing::info!(initiator = %key.initiator, target = %key.target, "reinstating an iSCSI session");
            // `changed` fails once the old session's handle is dropped.
            let _ =
                tokio::time::timeout(REINSTATE_WAIT, async { while ended.changed().await.is_ok() {} }).await;
        }
        let (stop_tx, stop) = watch::channel(false);
        let (ended_tx, ended) = watch::channel(());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.open.lock().insert(id, Entry { key, stop: stop_tx, ended });
        SessionHandle { sessions: self.clone(), id, stop, _ended: ended_tx }
    }

    /// Asks every session of `target` to end.
    pub fn stop_target(&self, target: &str) {
        for entry in self.open.lock().values().filter(|e| e.key.target == target) {
            let _ = entry.stop.send(true);
        }
    }

    /// Sessions open now.
    pub fn count(&self) -> usize {
        self.open.lock().len()
    }
}
