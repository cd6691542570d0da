//! Prometheus metrics: request counts, bytes, errors and latency histograms for every
//! volume, device and frontend export, plus gauges read when `/metrics` is scraped.
//!
//! Each level is measured by wrapping its block device in [`Metered`], whose counters are
//! looked up once when it is made, so a request pays two clock reads, a few atomic adds
//! and one uncontended lock (the histogram's) per level.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use strata_block::{BlockIo, Durability, Geometry, IoError, Span};
use strata_net::budget::Budget;
use strata_net::listener::Open;

/// Which level of the IO path a series measures.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types, missing_docs)]
pub enum Scope {
    volume,
    device,
    nbd,
    iscsi,
}

/// The kind of request.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types, missing_docs)]
pub enum Op {
    read,
    write,
    flush,
    discard,
    write_zeroes,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IoLabels {
    scope: Scope,
    name: String,
    op: Op,
}

/// Labels of per-object gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NameLabel {
    /// Volume, device or export name.
    pub name: String,
}

/// Labels of counters by reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why (for iSCSI login failures: authentication, not_allowed, no_such_target).
    pub reason: String,
}

/// A listener of the controller.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types, missing_docs)]
pub enum Protocol {
    nbd,
    iscsi,
    api,
}

/// The connection cap a refusal was over (strata_net::listener::Caps).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types, missing_docs)]
pub enum Cap {
    total,
    per_address,
}

/// Labels of refused connections.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    /// The listener that refused.
    pub protocol: Protocol,
    /// The cap the connection was over.
    pub cap: Cap,
}

/// What the frontends share and `/metrics` reads when scraped: the controller's byte
/// budget and every listener's count of connections.
pub struct Frontends {
    /// The byte budget of every NBD and iSCSI connection.
    pub budget: Arc<Budget>,
    /// Each listener's admitted and refused connections.
    pub listeners: Vec<(Protocol, Arc<Open>)>,
}

impl Frontends {
    /// Connections `protocol`'s listener holds open now (from accept to close, whatever
    /// phase they are in).
    pub fn connections(&self, protocol: Protocol) -> usize {
        self.listeners.iter().filter(|(p, _)| *p == protocol).map(|(_, open)| open.total()).sum()
    }
}

type HistogramFamily = Family<IoLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 4 µs to about 0.5 s.
    Histogram::new(exponential_buckets(4e-6, 2.0, 18))
}

/// Every metric of a controller.
pub struct Metrics {
    registry: Registry,
    requests: Family<IoLabels, Counter>,
    bytes: Family<IoLabels, Counter>,
    errors: Family<IoLabels, Counter>,
    latency: HistogramFamily,
    /// Volume state: 0 healthy, 1 degraded, 2 failed.
    pub volume_state: Family<NameLabel, Gauge>,
    /// Unallocated bytes per device.
    pub device_free_bytes: Family<NameLabel, Gauge>,
    /// Open NBD connections.
    pub nbd_connections: Gauge,
    /// Open iSCSI sessions.
    pub iscsi_sessions: Gauge,
    /// Refused iSCSI logins, by reason: someone guessing secrets, names or targets shows
    /// here first.
    pub iscsi_login_failures: Family<ReasonLabel, Counter>,
    /// Connections closed at accept for being over a listener's cap: a flood shows here.
    pub connections_refused: Family<RefusedLabels, Counter>,
    /// Bytes of the shared frontend budget held now.
    pub frontend_budget_used: Gauge,
    /// Connections waiting for room in the shared frontend budget.
    pub frontend_budget_waiters: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("strata");
        let requests = Family::<IoLabels, Counter>::default();
        let bytes = Family::<IoLabels, Counter>::default();
        let errors = Family::<IoLabels, Counter>::default();
        let latency = HistogramFamily::new_with_constructor(latency_histogram as fn() -> Histogram);
        let volume_state = Family::<NameLabel, Gauge>::default();
        let device_free_bytes = Family::<NameLabel, Gauge>::default();
        let nbd_connections = Gauge::default();
        registry.register("io_requests", "Block requests completed", requests.clone());
        registry.register("io_bytes", "Bytes read, written, discarded or zeroed", bytes.clone());
        registry.register("io_errors", "Block requests that failed", errors.clone());
        registry.register("io_latency_seconds", "Time from request to completion", latency.clone());
        registry.register("volume_state", "0 healthy, 1 degraded, 2 failed", volume_state.clone());
        registry.register("device_free_bytes", "Unallocated bytes of a device", device_free_bytes.clone());
        registry.register("nbd_connections", "Open NBD connections", nbd_connections.clone());
        let iscsi_sessions = Gauge::default();
        registry.register("iscsi_sessions", "Open iSCSI sessions", iscsi_sessions.clone());
        let iscsi_login_failures = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "iscsi_login_failures",
            "iSCSI logins refused for their credentials, initiator name or target",
            iscsi_login_failures.clone(),
        );
        let connections_refused = Family::<RefusedLabels, Counter>::default();
        registry.register(
            "connections_refused",
            "Connections closed at accept for being over a listener's total or per-address cap",
            connections_refused.clone(),
        );
        let frontend_budget_used = Gauge::default();
        registry.register_with_unit(
            "frontend_budget_used",
            "Bytes of the byte budget shared by NBD and iSCSI connections held now",
            prometheus_client::registry::Unit::Bytes,
            frontend_budget_used.clone(),
        );
        let frontend_budget_waiters = Gauge::default();
        registry.register(
            "frontend_budget_waiters",
            "Connections waiting for room in the shared byte budget",
            frontend_budget_waiters.clone(),
        );
        Self {
            registry,
            requests,
            bytes,
            errors,
            latency,
            volume_state,
            device_free_bytes,
            nbd_connections,
            iscsi_sessions,
            iscsi_login_failures,
            connections_refused,
            frontend_budget_used,
            frontend_budget_waiters,
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }

    /// Reads the budget and the listeners' refusal counts into their metrics (at scrape
    /// time, so accepting and charging pay nothing for them).
    pub fn update_frontends(&self, frontends: &Frontends) {
        self.frontend_budget_used.set(i64::try_from(frontends.budget.used()).unwrap_or(i64::MAX));
        self.frontend_budget_waiters.set(i64::try_from(frontends.budget.waiters()).unwrap_or(i64::MAX));
        for (protocol, open) in &frontends.listeners {
            let refused = open.refused();
            for (cap, count) in [(Cap::total, refused.total), (Cap::per_address, refused.per_address)] {
                let labels = RefusedLabels { protocol: *protocol, cap };
                // The listener's count is the source; the counter mirrors it (it only grows).
                self.connections_refused.get_or_create(&labels).inner().store(count, Ordering::Relaxed);
            }
        }
    }

    /// Wraps `inner` so its requests are counted under `scope` and `name`.
    pub fn meter(&self, scope: Scope, name: &str, inner: Arc<dyn BlockIo>) -> Arc<Metered> {
        let op = |op: Op| {
            let labels = IoLabels { scope, name: name.to_string(), op };
            OpMetrics {
                requests: self.requests.get_or_create(&labels).clone(),
                bytes: self.bytes.get_or_create(&labels).clone(),
                errors: self.errors.get_or_create(&labels).clone(),
                latency: self.latency.get_or_create(&labels).clone(),
            }
        };
        let ops = [op(Op::read), op(Op::write), op(Op::flush), op(Op::discard), op(Op::write_zeroes)];
        Arc::new(Metered { inner, ops })
    }
}

struct OpMetrics {
    requests: Counter,
    bytes: Counter,
    errors: Counter,
    latency: Histogram,
}

impl OpMetrics {
    fn record<T>(&self, started: Instant, bytes: u64, result: &Result<T, IoError>) {
        self.latency.observe(started.elapsed().as_secs_f64());
        self.requests.inc();
        match result {
            Ok(_) => {
                self.bytes.inc_by(bytes);
            }
            Err(_) => {
                self.errors.inc();
            }
        }
    }
}

/// A block device whose requests are counted and timed.
pub struct Metered {
    inner: Arc<dyn BlockIo>,
    ops: [OpMetrics; 5],
}

impl Metered {
    fn op(&self, op: Op) -> &OpMetrics {
        &self.ops[op as usize]
    }
}

#[async_trait]
impl BlockIo for Metered {
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }

    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, IoError> {
        let started = Instant::now();
        let result = self.inner.read(offset, len).await;
        self.op(Op::read).record(started, len, &result);
        result
    }

    async fn read_into(&self, offset: u64, buf: BytesMut) -> Result<BytesMut, IoError> {
        let (started, len) = (Instant::now(), buf.len() as u64);
        let result = self.inner.read_into(offset, buf).await;
        self.op(Op::read).record(started, len, &result);
        result
    }

    async fn write(&self, offset: u64, data: Bytes, durability: Durability) -> Result<(), IoError> {
        let (started, len) = (Instant::now(), data.len() as u64);
        let result = self.inner.write(offset, data, durability).await;
        self.op(Op::write).record(started, len, &result);
        result
    }

    async fn flush(&self) -> Result<(), IoError> {
        let started = Instant::now();
        let result = self.inner.flush().await;
        self.op(Op::flush).record(started, 0, &result);
        result
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<(), IoError> {
        let started = Instant::now();
        let result = self.inner.discard(offset, len).await;
        self.op(Op::discard).record(started, len, &result);
        result
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), IoError> {
        let started = Instant::now();
        let result = self.inner.write_zeroes(offset, len).await;
        self.op(Op::write_zeroes).record(started, len, &result);
        result
    }

    async fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Span>, IoError> {
        self.inner.allocation(offset, len).await
    }
}
