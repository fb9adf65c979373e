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
    /// TCP: clients not served (each reason of `berth_connect_errors_total`). UDP: ICMP
    /// errors and dropped datagrams.
    pub errors: u64,
    /// TCP: clients accepted; UDP: flows opened; in kernel mode, plus remote flows begun.
    #[serde(default)]
    pub connections: u64,
    /// TCP, mode auto: connections handed from splice to the kernel relay.
    #[serde(default)]
    pub promoted: u64,
}

/// One mapping's per-second rates between two `status` samples (`berth status --watch`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rates {
    pub name: String,
    pub connections: f64,
    pub bytes_to_target: f64,
    pub bytes_to_client: f64,
    pub errors: f64,
}

/// The rates of each row of `now` since `before`, `secs` earlier; `None` for a mapping that
/// was not there then. A counter that went back (a mapping removed and added again under the
/// same name) counts from zero.
pub fn rates(before: &[Row], now: &[Row], secs: f64) -> Vec<Option<Rates>> {
    now.iter()
        .map(|r| {
            let b = before.iter().find(|b| b.name == r.name)?;
            let per_s = |now: u64, then: u64| {
                let then = if now < then { 0 } else { then };
                (now - then) as f64 / secs.max(1e-3)
            };
            Some(Rates {
                name: r.name.clone(),
                connections: per_s(r.connections, b.connections),
                bytes_to_target: per_s(r.bytes_to_target, b.bytes_to_target),
                bytes_to_client: per_s(r.bytes_to_client, b.bytes_to_client),
                errors: per_s(r.errors, b.errors),
            })
        })
        .collect()
}

impl Row {
    pub(crate) fn of(m: &Running) -> Self {
        let (mut active, mut up, mut down, errors, mut connections, promoted) =
            match &m.counters.relay {
                RelayCounters::Tcp(s) => {
                    let s = s.snapshot();
                    (
                        s.active,
                        s.bytes_to_target,
                        s.bytes_to_client,
                        s.errors_total(),
                        s.accepted,
                        s.promoted,
                    )
                }
                RelayCounters::Udp(s) => {
                    let s = s.snapshot();
                    (
                        s.flows_active,
                        s.bytes_to_target,
                        s.bytes_to_client,
                        s.unreachable + s.dropped,
                        s.flows_created,
                        0,
                    )
                }
            };
        // Kernel mode: remote flows' frame bytes on top of the relay's (local connections
        // bypass every counter).
        if let Some(d) = &m.counters.dnat {
            let s = d.snapshot();
            active += s.conntrack_entries;
            connections += s.flows;
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
            connections,
            promoted,
        }
    }
}

/// The rows as an aligned text table.
pub fn table(rows: &[Row]) -> String {
    render(rows, None)
}

/// The rows with their rates (`berth status --watch`): connections, bytes each way and
/// errors per second; `-` for a mapping new since the last sample.
pub fn table_with_rates(rows: &[Row], rates: &[Option<Rates>]) -> String {
    render(rows, Some(rates))
}

fn render(rows: &[Row], rates: Option<&[Option<Rates>]>) -> String {
    let mut header = vec![
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
        "PROMOTED",
    ];
    if rates.is_some() {
        header.extend(["CONN/S", "TO TARGET/S", "TO CLIENT/S", "ERR/S"]);
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut cells = vec![
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
                r.promoted.to_string(),
            ];
            if let Some(rates) = rates {
                match rates.get(i).and_then(Option::as_ref) {
                    Some(x) => cells.extend([
                        format!("{:.1}", x.connections),
                        bytes(x.bytes_to_target as u64),
                        bytes(x.bytes_to_client as u64),
                        format!("{:.1}", x.errors),
                    ]),
                    None => cells.extend(std::iter::repeat_n("-".to_owned(), 4)),
                }
            }
            cells
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
    let mut out = line(header.clone());
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
            connections: 7,
            promoted: 2,
        };
        let t = table(&[row]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("NAME  PROTO  LISTEN"), "{t}");
        assert!(
            lines[1].contains("1.5 KiB") && lines[1].contains("10 B"),
            "{t}"
        );
        assert_eq!(lines[0].find("LISTEN"), lines[1].find("0.0.0.0"), "{t}");
        assert!(
            lines[0].ends_with("PROMOTED") && lines[1].ends_with('2'),
            "{t}"
        );
        assert!(table(&[]).contains("(no mappings)"));
    }

    #[test]
    fn rates_per_second_between_two_samples() {
        let row = |name: &str, connections, up, errors| Row {
            name: name.into(),
            proto: "tcp".into(),
            listen: String::new(),
            target: String::new(),
            mode: String::new(),
            owner: String::new(),
            state: "active".into(),
            active: 0,
            bytes_to_target: up,
            bytes_to_client: 0,
            errors,
            connections,
            promoted: 0,
        };
        let before = [row("web", 10, 1 << 20, 1), row("gone", 5, 0, 0)];
        let now = [row("web", 30, 3 << 20, 1), row("new", 1, 0, 0)];
        let r = rates(&before, &now, 2.0);
        let web = r[0].as_ref().unwrap();
        assert_eq!(
            (web.connections, web.bytes_to_target, web.errors),
            (10.0, 1048576.0, 0.0)
        );
        assert!(r[1].is_none(), "new since the last sample");
        // A counter that went back (removed and added again) counts from zero.
        let again = rates(&[row("web", 50, 0, 0)], &[row("web", 4, 0, 0)], 1.0);
        assert_eq!(again[0].as_ref().unwrap().connections, 4.0);
        let t = table_with_rates(&now, &r);
        assert!(t.lines().next().unwrap().ends_with("ERR/S"), "{t}");
        assert!(t.contains("1.0 MiB"), "{t}");
        assert!(t.lines().nth(2).unwrap().ends_with('-'), "{t}");
    }
}
