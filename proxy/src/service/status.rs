//! What `berth status` shows: one row per mapping, as a table or as JSON.
use serde::{Deserialize, Serialize};

use super::mapping::{Counters, Running};

/// One mapping's state and counters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    pub name: String,
    pub proto: String,
    pub listen: String,
    pub target: String,
    pub mode: String,
    /// `active`, or `draining` (removed or replaced by a reload, connections still open).
    pub state: String,
    /// Open connections (TCP) or flows (UDP); in kernel mode, conntrack entries.
    pub active: u64,
    pub bytes_to_target: u64,
    pub bytes_to_client: u64,
    /// TCP: clients not served (refused, timeout, unreachable, limit). UDP: ICMP errors and
    /// dropped datagrams.
    pub errors: u64,
}

impl Row {
    pub(crate) fn of(m: &Running) -> Self {
        let (active, up, down, errors) = match &m.counters {
            Counters::Tcp(s) => {
                let s = s.snapshot();
                (
                    s.active,
                    s.bytes_to_target,
                    s.bytes_to_client,
                    s.errors_total(),
                )
            }
            Counters::Udp(s) => {
                let s = s.snapshot();
                (
                    s.flows_active,
                    s.bytes_to_target,
                    s.bytes_to_client,
                    s.unreachable + s.dropped,
                )
            }
            // Remote flows' frame bytes; local connections bypass every counter.
            Counters::Dnat(m) => {
                let s = m.snapshot();
                (s.conntrack_entries, s.bytes_in, s.bytes_out, 0)
            }
        };
        Self {
            name: m.spec.name.clone(),
            proto: m.spec.proto.to_string(),
            listen: m
                .local
                .map_or_else(|| m.spec.listen.to_string(), |a| a.to_string()),
            target: m.spec.target.to_string(),
            mode: m.mode.into(),
            state: if m.is_draining() {
                "draining"
            } else {
                "active"
            }
            .into(),
            active,
            bytes_to_target: up,
            bytes_to_client: down,
            errors,
        }
    }
}

impl Row {
    /// A kernel-mode mapping that could not start; `why` is in the state column.
    pub(crate) fn failed(spec: &super::config::MappingSpec, why: &str) -> Self {
        Self {
            name: spec.name.clone(),
            proto: spec.proto.to_string(),
            listen: spec.listen.to_string(),
            target: spec.target.to_string(),
            mode: spec.mode.to_string(),
            state: format!("failed: {why}"),
            active: 0,
            bytes_to_target: 0,
            bytes_to_client: 0,
            errors: 0,
        }
    }
}

/// The rows as an aligned text table.
pub fn table(rows: &[Row]) -> String {
    let header = [
        "NAME",
        "PROTO",
        "LISTEN",
        "TARGET",
        "MODE",
        "STATE",
        "ACTIVE",
        "TO TARGET",
        "TO CLIENT",
        "ERRORS",
    ];
    let cells: Vec<[String; 10]> = rows
        .iter()
        .map(|r| {
            [
                r.name.clone(),
                r.proto.clone(),
                r.listen.clone(),
                r.target.clone(),
                r.mode.clone(),
                r.state.clone(),
                r.active.to_string(),
                bytes(r.bytes_to_target),
                bytes(r.bytes_to_client),
                r.errors.to_string(),
            ]
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cols: Vec<&str>| {
        cols.iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = line(header.to_vec());
    out.push('\n');
    for row in &cells {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    if rows.is_empty() {
        out.push_str("(no mappings)\n");
    }
    out
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_and_humanises_bytes() {
        let row = Row {
            name: "web".into(),
            proto: "tcp".into(),
            listen: "0.0.0.0:9091".into(),
            target: "172.16.1.1:80".into(),
            mode: "splice".into(),
            state: "active".into(),
            active: 3,
            bytes_to_target: 1536,
            bytes_to_client: 10,
            errors: 0,
        };
        let t = table(&[row]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("NAME  PROTO  LISTEN"), "{t}");
        assert!(
            lines[1].contains("1.5 KiB") && lines[1].contains("10 B"),
            "{t}"
        );
        assert_eq!(lines[0].find("LISTEN"), lines[1].find("0.0.0.0"), "{t}");
        assert!(table(&[]).contains("(no mappings)"));
    }
}
