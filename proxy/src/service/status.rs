//! What `berth status` shows: one row per mapping, as a table or as JSON.
use serde::{Deserialize, Serialize};

use crate::mapping::{RelayCounters, Running};

/// One mapping's state and counters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    pub name: String,
    pub proto: String,
    pub listen: String,
    pub target: String,
    pub mode: String,
    /// `config` for the file's mappings, else who added it at run time (`docker`, ...).
    #[serde(default)]
    pub owner: String,
    /// `active`; `draining` (removed or replaced, connections still open); or `failed: why`
    /// for a kernel-mode mapping that kernel mode could not map (its relay serves it).
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
        let (mut active, mut up, mut down, errors) = match &m.counters.relay {
            RelayCounters::Tcp(s) => {
                let s = s.snapshot();
                (
                    s.active,
                    s.bytes_to_target,
                    s.bytes_to_client,
                    s.errors_total(),
                )
            }
            RelayCounters::Udp(s) => {
                let s = s.snapshot();
                (
                    s.flows_active,
                    s.bytes_to_target,
                    s.bytes_to_client,
                    s.unreachable + s.dropped,
                )
            }
        };
        // Kernel mode: remote flows' frame bytes on top of the relay's (local connections
        // bypass every counter).
        if let Some(d) = &m.counters.dnat {
            let s = d.snapshot();
            active += s.conntrack_entries;
            up += s.bytes_in;
            down += s.bytes_out;
        }
        let state = match (&m.kernel_error, m.is_draining()) {
            (_, true) => "draining".to_owned(),
            (Some(why), false) => format!("failed: {why} (served by the relay)"),
            (None, false) => "active".to_owned(),
        };
        Self {
            name: m.spec.name.clone(),
            proto: m.spec.proto.to_string(),
            listen: m
                .local
                .map_or_else(|| m.spec.listen.to_string(), |a| a.to_string()),
            target: m.spec.target.to_string(),
            mode: m.mode.into(),
            owner: m.owner.clone(),
            state,
            active,
            bytes_to_target: up,
            bytes_to_client: down,
            errors,
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
        "OWNER",
        "STATE",
        "ACTIVE",
        "TO TARGET",
        "TO CLIENT",
        "ERRORS",
    ];
    let cells: Vec<[String; 11]> = rows
        .iter()
        .map(|r| {
            [
                r.name.clone(),
                r.proto.clone(),
                r.listen.clone(),
                r.target.clone(),
                r.mode.clone(),
                r.owner.clone(),
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
            owner: "config".into(),
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
