//! Prometheus metrics: a collector that reads every mapping's live counters at scrape time,
//! process metrics, `berth_build_info`, and the HTTP endpoint (axum) that serves them.
//!
//! Labels name the mapping and its protocol, never a client address.
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
};

use axum::{Router, http::header, response::IntoResponse, routing::get};
use prometheus::{
    Encoder as _, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
    core::{Collector, Desc},
    proto,
};
use tokio::net::TcpListener;
use tracing::{info, warn};

use super::State;
use crate::{
    forward,
    mapping::{RelayCounters, Running},
};

/// Reads the mappings' counters when scraped.
#[derive(Debug)]
struct Mappings {
    state: Arc<Mutex<State>>,
    descs: Vec<Desc>,
}

const MAPPING_LABELS: [&str; 2] = ["mapping", "proto"];

/// The families this collector emits, built fresh (and filled) for each scrape.
struct Families {
    info: IntGaugeVec,
    connections: IntCounterVec,
    active: IntGaugeVec,
    bytes: IntCounterVec,
    errors: IntCounterVec,
    idle_closed: IntCounterVec,
    promoted: IntCounterVec,
    chosen_ports: IntCounterVec,
    flows_active: IntGaugeVec,
    flows_created: IntCounterVec,
    flows_expired: IntCounterVec,
    flows_evicted: IntCounterVec,
    datagrams: IntCounterVec,
    udp_unreachable: IntCounterVec,
    udp_dropped: IntCounterVec,
    udp_offload_refused: IntCounterVec,
    dnat_flows: IntCounterVec,
    dnat_local: IntCounterVec,
    dnat_too_big: IntCounterVec,
    dnat_packets: IntCounterVec,
    dnat_bytes: IntCounterVec,
    dnat_conntrack: IntGaugeVec,
    failed: IntGaugeVec,
}

impl Families {
    #[expect(clippy::unwrap_used, reason = "constant, valid metric definitions")]
    fn new() -> Self {
        let counter = |name: &str, help: &str, extra: &[&str]| {
            let labels: Vec<&str> = MAPPING_LABELS.iter().chain(extra).copied().collect();
            IntCounterVec::new(Opts::new(name, help), &labels).unwrap()
        };
        let gauge = |name: &str, help: &str, extra: &[&str]| {
            let labels: Vec<&str> = MAPPING_LABELS.iter().chain(extra).copied().collect();
            IntGaugeVec::new(Opts::new(name, help), &labels).unwrap()
        };
        Self {
            info: gauge(
                "berth_mapping_info",
                "A mapping (1), with its addresses, the mode in use and who added it (config, docker, ...).",
                &["listen", "target", "mode", "state", "owner"],
            ),
            connections: counter("berth_connections_total", "TCP clients accepted.", &[]),
            active: gauge("berth_connections_active", "TCP connections open now.", &[]),
            bytes: counter(
                "berth_bytes_total",
                "Payload bytes forwarded, counted while connections are live.",
                &["direction"],
            ),
            errors: counter(
                "berth_connect_errors_total",
                "TCP clients not served, by reason (refused, timeout, unreachable, limit, client_limit, descriptors, ports, other).",
                &["reason"],
            ),
            idle_closed: counter(
                "berth_connections_idle_closed_total",
                "TCP connections reset by the idle timeout.",
                &[],
            ),
            promoted: counter(
                "berth_connections_promoted_total",
                "TCP connections that mode auto handed from splice to the kernel relay (sockmap).",
                &[],
            ),
            chosen_ports: counter(
                "berth_connect_chosen_ports_total",
                "TCP connects to the target from a local port berth chose because the kernel had none left (most often one whose earlier connection was in TIME_WAIT, reused under TCP timestamps).",
                &[],
            ),
            flows_active: gauge("berth_udp_flows_active", "UDP flows open now.", &[]),
            flows_created: counter("berth_udp_flows_total", "UDP flows opened.", &[]),
            flows_expired: counter(
                "berth_udp_flows_expired_total",
                "UDP flows closed after the idle timeout.",
                &[],
            ),
            flows_evicted: counter(
                "berth_udp_flows_evicted_total",
                "UDP flows evicted because the flow table was full: an address holding half the table loses its own least recently used flow, any other the table's.",
                &[],
            ),
            datagrams: counter(
                "berth_udp_datagrams_total",
                "UDP datagrams forwarded.",
                &["direction"],
            ),
            udp_unreachable: counter(
                "berth_udp_target_unreachable_total",
                "ICMP errors (port, host or network unreachable) reported for the target.",
                &[],
            ),
            udp_dropped: counter(
                "berth_udp_dropped_total",
                "UDP datagrams that could not be forwarded.",
                &[],
            ),
            udp_offload_refused: counter(
                "berth_udp_offload_refused_total",
                "Segmented UDP sends (UDP_SEGMENT) a path refused; their datagrams were sent again one by one.",
                &[],
            ),
            dnat_flows: counter(
                "berth_dnat_flows_total",
                "Kernel mode: remote flows begun (conntrack entries created).",
                &[],
            ),
            dnat_local: counter(
                "berth_dnat_local_rewrites_total",
                "Kernel mode: local connects and unconnected UDP sends pointed at the target.",
                &[],
            ),
            dnat_too_big: counter(
                "berth_dnat_too_big_total",
                "Kernel mode: packets too big for the next link, answered with ICMP fragmentation needed / packet too big (or, IPv4 without DF to the target, left to the relay).",
                &[],
            ),
            dnat_packets: counter(
                "berth_dnat_packets_total",
                "Kernel mode: packets of remote flows rewritten, by direction.",
                &["direction"],
            ),
            dnat_bytes: counter(
                "berth_dnat_bytes_total",
                "Kernel mode: frame bytes of remote flows rewritten, by direction.",
                &["direction"],
            ),
            dnat_conntrack: gauge(
                "berth_dnat_conntrack_entries",
                "Kernel mode: conntrack entries of the mapping (as of the last sweep).",
                &[],
            ),
            failed: gauge(
                "berth_mapping_failed",
                "A kernel-mode mapping that could not start (1); the reason is in the log and in `berth status`.",
                &["mode"],
            ),
        }
    }

    fn collectors(&self) -> [&dyn Collector; 23] {
        [
            &self.info,
            &self.connections,
            &self.active,
            &self.bytes,
            &self.errors,
            &self.idle_closed,
            &self.promoted,
            &self.chosen_ports,
            &self.flows_active,
            &self.flows_created,
            &self.flows_expired,
            &self.flows_evicted,
            &self.datagrams,
            &self.udp_unreachable,
            &self.udp_dropped,
            &self.udp_offload_refused,
            &self.dnat_flows,
            &self.dnat_local,
            &self.dnat_too_big,
            &self.dnat_packets,
            &self.dnat_bytes,
            &self.dnat_conntrack,
            &self.failed,
        ]
    }

    fn fill(&self, m: &Running) {
        let spec = &m.spec;
        let base = [spec.name.as_str(), spec.proto.as_str()];
        let with = |extra: &[&str]| -> Vec<String> {
            base.iter().chain(extra).map(|s| (*s).to_owned()).collect()
        };
        fn labels(v: &[String]) -> Vec<&str> {
            v.iter().map(String::as_str).collect()
        }
        let state = if m.is_draining() {
            "draining"
        } else {
            "active"
        };
        let listen = m
            .local
            .map_or_else(|| spec.listen.to_string(), |a| a.to_string());
        let target = spec.target.to_string();
        let info = with(&[&listen, &target, m.mode, state, &m.owner]);
        self.info.with_label_values(&labels(&info)).set(1);
        let count = |v: &IntCounterVec, extra: &[&str], n: u64| {
            v.with_label_values(&labels(&with(extra))).inc_by(n);
        };
        let set = |v: &IntGaugeVec, n: u64| {
            v.with_label_values(&labels(&with(&[])))
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        };
        match &m.counters.relay {
            RelayCounters::Tcp(s) => {
                let s = s.snapshot();
                count(&self.connections, &[], s.accepted);
                set(&self.active, s.active);
                count(&self.bytes, &["to_target"], s.bytes_to_target);
                count(&self.bytes, &["to_client"], s.bytes_to_client);
                for (reason, n) in s.errors {
                    count(&self.errors, &[reason], n);
                }
                count(&self.idle_closed, &[], s.idle_closed);
                count(&self.promoted, &[], s.promoted);
                count(&self.chosen_ports, &[], s.chosen_ports);
            }
            RelayCounters::Udp(s) => {
                let s = s.snapshot();
                set(&self.flows_active, s.flows_active);
                count(&self.flows_created, &[], s.flows_created);
                count(&self.flows_expired, &[], s.flows_expired);
                count(&self.flows_evicted, &[], s.flows_evicted);
                count(&self.bytes, &["to_target"], s.bytes_to_target);
                count(&self.bytes, &["to_client"], s.bytes_to_client);
                count(&self.datagrams, &["to_target"], s.datagrams_to_target);
                count(&self.datagrams, &["to_client"], s.datagrams_to_client);
                count(&self.udp_unreachable, &[], s.unreachable);
                count(&self.udp_dropped, &[], s.dropped);
                count(&self.udp_offload_refused, &[], s.offload_refused);
            }
        }
        if let Some(d) = &m.counters.dnat {
            {
                let s = d.snapshot();
                count(&self.dnat_flows, &[], s.flows);
                count(&self.dnat_local, &[], s.local_rewrites);
                count(&self.dnat_too_big, &[], s.too_big);
                count(&self.dnat_packets, &["to_target"], s.packets_in);
                count(&self.dnat_packets, &["to_client"], s.packets_out);
                count(&self.dnat_bytes, &["to_target"], s.bytes_in);
                count(&self.dnat_bytes, &["to_client"], s.bytes_out);
                set(&self.dnat_conntrack, s.conntrack_entries);
            }
        }
    }
}

const DURATION_NAME: &str = "berth_connection_duration_seconds";
const DURATION_HELP: &str = "How long TCP connections lasted, from accept to close.";

impl Collector for Mappings {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        let families = Families::new();
        let mut durations = Vec::new();
        {
            let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            // A mapping replaced by a reload shares its counters with its successor: count
            // each name once (the active one comes first).
            let mut seen = std::collections::HashSet::new();
            for m in state.all().filter(|m| m.kernel_error.is_some()) {
                families
                    .failed
                    .with_label_values(&[m.spec.name.as_str(), m.spec.proto.as_str(), "dnat"])
                    .set(1);
            }
            for m in state.all().filter(|m| seen.insert(m.spec.name.clone())) {
                families.fill(m);
                if let RelayCounters::Tcp(s) = &m.counters.relay {
                    durations.push(duration_metric(&m.spec.name, &s.snapshot()));
                }
            }
        }
        let mut out: Vec<proto::MetricFamily> = families
            .collectors()
            .iter()
            .flat_map(|c| c.collect())
            .filter(|f| !f.get_metric().is_empty())
            .collect();
        if !durations.is_empty() {
            let mut f = proto::MetricFamily::default();
            f.set_name(DURATION_NAME.into());
            f.set_help(DURATION_HELP.into());
            f.set_field_type(proto::MetricType::HISTOGRAM);
            f.set_metric(durations);
            out.push(f);
        }
        out
    }
}

fn duration_metric(mapping: &str, s: &forward::Snapshot) -> proto::Metric {
    let label = |name: &str, value: &str| {
        let mut l = proto::LabelPair::default();
        l.set_name(name.into());
        l.set_value(value.into());
        l
    };
    let mut h = proto::Histogram::default();
    h.set_sample_count(s.duration_count);
    h.set_sample_sum(s.duration_sum);
    h.set_bucket(
        s.duration_buckets
            .iter()
            .map(|&(le, n)| {
                let mut b = proto::Bucket::default();
                b.set_upper_bound(le);
                b.set_cumulative_count(n);
                b
            })
            .collect(),
    );
    let mut m = proto::Metric::from_label(vec![label("mapping", mapping), label("proto", "tcp")]);
    m.set_histogram(h);
    m
}

/// Every metric family berth exports, by name (histograms without their `_bucket`, `_sum`
/// and `_count` series): what a dashboard or an alert rule may query.
pub fn family_names() -> Vec<String> {
    let registry = registry(Arc::default(), 1);
    let families = Families::new();
    let process = prometheus::process_collector::ProcessCollector::for_self();
    let mut collectors = families.collectors().to_vec();
    collectors.push(&process);
    let mut names: Vec<String> = collectors
        .iter()
        .flat_map(|c| c.desc().into_iter().map(|d| d.fq_name.clone()))
        .chain([DURATION_NAME.to_owned()])
        .chain(registry.gather().iter().map(|f| f.name().to_owned()))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The registry behind `/metrics`; `conntrack_capacity` is kernel mode's table size.
pub(crate) fn registry(state: Arc<Mutex<State>>, conntrack_capacity: u32) -> Registry {
    let registry = Registry::new();
    let mut descs: Vec<Desc> = Families::new()
        .collectors()
        .iter()
        .flat_map(|c| c.desc().into_iter().cloned())
        .collect();
    if let Ok(d) = Desc::new(
        DURATION_NAME.into(),
        DURATION_HELP.into(),
        MAPPING_LABELS.iter().map(|s| (*s).to_owned()).collect(),
        Default::default(),
    ) {
        descs.push(d);
    }
    let register = |c: Box<dyn Collector>| {
        if let Err(e) = registry.register(c) {
            warn!(error = %e, "cannot register a metrics collector");
        }
    };
    register(Box::new(Mappings { state, descs }));
    register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ));
    if let Ok(info) = IntGaugeVec::new(
        Opts::new("berth_build_info", "berth's version (1)."),
        &["version"],
    ) {
        info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        register(Box::new(info));
    }
    if let Ok(capacity) = prometheus::IntGauge::new(
        "berth_dnat_conntrack_capacity",
        "Kernel mode: entries the conntrack table holds, shared by every kernel-mode mapping ([dnat] conntrack_entries).",
    ) {
        capacity.set(i64::from(conntrack_capacity));
        register(Box::new(capacity));
    }
    registry
}

/// The metrics listener at `addr`: the one a predecessor passed if it is bound there (a
/// hand-over keeps the port open throughout), else a fresh bind.
pub(crate) fn listener(
    addr: SocketAddr,
    passed: Option<std::os::fd::OwnedFd>,
) -> Result<TcpListener, crate::listen::ListenError> {
    if let Some(fd) = passed {
        let std = std::net::TcpListener::from(fd);
        if std.local_addr().ok() == Some(addr)
            && std.set_nonblocking(true).is_ok()
            && let Ok(l) = TcpListener::from_std(std)
        {
            return Ok(l);
        }
    }
    crate::listen::bind_tcp(addr.into())
}

/// Serves `registry` at `/metrics` on `listener` until the task is dropped.
pub(crate) async fn serve(listener: TcpListener, registry: Registry) {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    info!(listen = ?addr, "metrics at /metrics");
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move {
                let mut body = Vec::new();
                let encoder = TextEncoder::new();
                if let Err(e) = encoder.encode(&registry.gather(), &mut body) {
                    warn!(error = %e, "cannot encode metrics");
                }
                (
                    [(header::CONTENT_TYPE, encoder.format_type().to_owned())],
                    body,
                )
                    .into_response()
            }
        }),
    );
    if let Err(e) = axum::serve(listener, app).await {
        warn!(error = %e, "metrics endpoint stopped");
    }
}
