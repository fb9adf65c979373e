//! What a sample measures: one typed metric per figure, in report order (the first present
//! in a table is its headline, given as a ratio to `direct`).
use std::collections::BTreeMap;

use serde::{Serialize, Serializer};

/// The figures of one sample.
pub(crate) type Metrics = BTreeMap<Metric, f64>;

/// One figure. The declaration order is the report's column order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Metric {
    KdgramPerSec,
    GbitPerSec,
    SlowestTenthConnPerSec,
    ConnPerSec,
    P50Us,
    PssMib,
    StartupSecs,
    CpuSecsPerGb,
    MachineCpuSecsPerGb,
    CpuUsPerDgram,
    LossPct,
    P99Us,
    P999Us,
    P99Ms,
    RssMib,
    Processes,
    PssKibPerProxy,
    MemAvailableDropMib,
    ReadyMs,
    HeldLost,
    NewFailed,
    LongestGapMs,
}

impl Metric {
    pub(crate) const ALL: [Self; 22] = [
        Self::KdgramPerSec,
        Self::GbitPerSec,
        Self::SlowestTenthConnPerSec,
        Self::ConnPerSec,
        Self::P50Us,
        Self::PssMib,
        Self::StartupSecs,
        Self::CpuSecsPerGb,
        Self::MachineCpuSecsPerGb,
        Self::CpuUsPerDgram,
        Self::LossPct,
        Self::P99Us,
        Self::P999Us,
        Self::P99Ms,
        Self::RssMib,
        Self::Processes,
        Self::PssKibPerProxy,
        Self::MemAvailableDropMib,
        Self::ReadyMs,
        Self::HeldLost,
        Self::NewFailed,
        Self::LongestGapMs,
    ];

    /// The key in results.json (kept stable: earlier results under bench/results use it).
    pub(crate) fn key(self) -> &'static str {
        match self {
            Self::KdgramPerSec => "kdgram_s",
            Self::GbitPerSec => "gbit_s",
            Self::SlowestTenthConnPerSec => "slowest_tenth_conn_s",
            Self::ConnPerSec => "conn_s",
            Self::P50Us => "p50_us",
            Self::PssMib => "pss_mib",
            Self::StartupSecs => "startup_s",
            Self::CpuSecsPerGb => "cpu_s_per_gb",
            Self::MachineCpuSecsPerGb => "machine_cpu_s_per_gb",
            Self::CpuUsPerDgram => "cpu_us_per_dgram",
            Self::LossPct => "loss_pct",
            Self::P99Us => "p99_us",
            Self::P999Us => "p999_us",
            Self::P99Ms => "p99_ms",
            Self::RssMib => "rss_mib",
            Self::Processes => "processes",
            Self::PssKibPerProxy => "pss_kib_per_proxy",
            Self::MemAvailableDropMib => "mem_available_drop_mib",
            Self::ReadyMs => "ready_ms",
            Self::HeldLost => "held_lost",
            Self::NewFailed => "new_failed",
            Self::LongestGapMs => "longest_gap_ms",
        }
    }

    /// Whether more is better (throughput, rates); otherwise less is (latency, CPU, memory).
    pub(crate) fn higher_is_better(self) -> bool {
        matches!(
            self,
            Self::KdgramPerSec | Self::GbitPerSec | Self::SlowestTenthConnPerSec | Self::ConnPerSec
        )
    }

    /// The column heading in the Markdown report.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::KdgramPerSec => "k datagrams/s",
            Self::GbitPerSec => "Gbit/s",
            Self::SlowestTenthConnPerSec => "slowest tenth, conn/s",
            Self::ConnPerSec => "conn/s",
            Self::P50Us => "p50 µs",
            Self::PssMib => "PSS MiB",
            Self::StartupSecs => "start-up s",
            Self::CpuSecsPerGb => "CPU s/GB",
            Self::MachineCpuSecsPerGb => "machine CPU s/GB",
            Self::CpuUsPerDgram => "CPU µs/datagram",
            Self::LossPct => "loss %",
            Self::P99Us => "p99 µs",
            Self::P999Us => "p99.9 µs",
            Self::P99Ms => "p99 ms",
            Self::RssMib => "RSS MiB",
            Self::Processes => "processes",
            Self::PssKibPerProxy => "PSS KiB per process",
            Self::MemAvailableDropMib => "MemAvailable drop MiB",
            Self::ReadyMs => "spawn to ready ms (median)",
            Self::HeldLost => "held connections lost",
            Self::NewFailed => "new connections failed",
            Self::LongestGapMs => "longest gap between new connections, ms",
        }
    }
}

impl Serialize for Metric {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.key())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_every_metric_in_report_order_with_distinct_keys() {
        let mut sorted = Metric::ALL;
        sorted.sort();
        assert_eq!(sorted, Metric::ALL, "ALL must follow the declaration order");
        let keys: std::collections::BTreeSet<_> = Metric::ALL.iter().map(|m| m.key()).collect();
        assert_eq!(keys.len(), Metric::ALL.len());
    }

    #[test]
    fn json_keys_are_the_stable_names() {
        let m = Metrics::from([(Metric::GbitPerSec, 1.5), (Metric::P999Us, 2.0)]);
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"gbit_s":1.5,"p999_us":2.0}"#
        );
    }
}
