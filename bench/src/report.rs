//! Turning samples into the Markdown table and the JSON file.
use std::{collections::BTreeMap, fmt::Write as _};

use serde::Serialize;

use crate::contender::Contender;

/// One measurement of one contender in one scenario variant.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Sample {
    pub(crate) scenario: &'static str,
    pub(crate) variant: String,
    pub(crate) contender: Contender,
    pub(crate) rep: u32,
    /// Warm-up samples are recorded in the JSON but left out of every summary.
    pub(crate) warmup: bool,
    pub(crate) metrics: BTreeMap<&'static str, f64>,
}

/// How each metric is shown. The first metric of a table is its headline: the one given as a
/// ratio to `direct`.
pub(crate) fn metric_label(m: &str) -> &'static str {
    match m {
        "kdgram_s" => "k datagrams/s",
        "gbit_s" => "Gbit/s",
        "cpu_s_per_gb" => "CPU s/GB",
        "machine_cpu_s_per_gb" => "machine CPU s/GB",
        "cpu_us_per_dgram" => "CPU µs/datagram",
        "loss_pct" => "loss %",
        "p50_us" => "p50 µs",
        "p99_us" => "p99 µs",
        "p999_us" => "p99.9 µs",
        "conn_s" => "conn/s",
        "p99_ms" => "p99 ms",
        "pss_mib" => "PSS MiB",
        "rss_mib" => "RSS MiB",
        "startup_s" => "start-up s",
        "processes" => "processes",
        "pss_kib_per_proxy" => "PSS KiB per process",
        "mem_available_drop_mib" => "MemAvailable drop MiB",
        "ready_ms" => "spawn to ready ms (median)",
        _ => "?",
    }
}

/// Median and spread of one metric.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Stat {
    pub(crate) median: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
    pub(crate) n: usize,
}

pub(crate) fn stat(values: &[f64]) -> Option<Stat> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    let median = if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    };
    Some(Stat {
        median,
        min: v[0],
        max: v[v.len() - 1],
        n: v.len(),
    })
}

/// `(scenario, variant) → contender → metric → values`, in first-seen order.
pub(crate) type Grouped = Vec<(
    (&'static str, String),
    BTreeMap<Contender, BTreeMap<&'static str, Vec<f64>>>,
)>;

pub(crate) fn group(samples: &[Sample]) -> Grouped {
    let mut out: Grouped = Vec::new();
    for s in samples.iter().filter(|s| !s.warmup) {
        let key = (s.scenario, s.variant.clone());
        let idx = match out.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                out.push((key, BTreeMap::new()));
                out.len() - 1
            }
        };
        let per = out[idx].1.entry(s.contender).or_default();
        for (m, v) in &s.metrics {
            per.entry(m).or_default().push(*v);
        }
    }
    out
}

fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// The Markdown report: one table per scenario variant.
pub(crate) fn markdown(samples: &[Sample], metric_order: &[&'static str]) -> String {
    let mut md = String::new();
    for ((scenario, variant), per) in group(samples) {
        let mut metrics: Vec<&'static str> = metric_order
            .iter()
            .copied()
            .filter(|m| per.values().any(|c| c.contains_key(m)))
            .collect();
        metrics.dedup();
        let Some(&headline) = metrics.first() else {
            continue;
        };
        let direct = per
            .get(&Contender::Direct)
            .and_then(|c| c.get(headline))
            .and_then(|v| stat(v))
            .map(|s| s.median);
        let _ = writeln!(md, "\n### {scenario}: {variant}\n");
        let mut header = format!(
            "| contender | {} (median, min–max) |",
            metric_label(headline)
        );
        if direct.is_some() {
            header.push_str(" × direct |");
        }
        for m in &metrics[1..] {
            let _ = write!(header, " {} |", metric_label(m));
        }
        let cols = header.matches('|').count() - 1;
        let _ = writeln!(md, "{header}\n|{}", "---|".repeat(cols));
        for (contender, values) in &per {
            let cell = |m: &str| match values.get(m).and_then(|v| stat(v)) {
                Some(s) if s.n > 1 => format!(
                    "{} ({}–{})",
                    fmt_num(s.median),
                    fmt_num(s.min),
                    fmt_num(s.max)
                ),
                Some(s) => fmt_num(s.median),
                None => "–".to_owned(),
            };
            let mut row = format!("| {} | {} |", contender.name(), cell(headline));
            if let Some(d) = direct {
                let ratio = values
                    .get(headline)
                    .and_then(|v| stat(v))
                    .map(|s| s.median / d);
                let _ = write!(
                    row,
                    " {} |",
                    ratio.map_or("–".to_owned(), |r| format!("{r:.2}"))
                );
            }
            for m in &metrics[1..] {
                let _ = write!(row, " {} |", cell(m));
            }
            let _ = writeln!(md, "{row}");
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(c: Contender, v: f64, warmup: bool) -> Sample {
        Sample {
            scenario: "bulk",
            variant: "1 stream".into(),
            contender: c,
            rep: 1,
            warmup,
            metrics: BTreeMap::from([("gbit_s", v)]),
        }
    }

    #[test]
    fn stat_is_median_with_spread() {
        let s = stat(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        assert_eq!(stat(&[1.0, 4.0]).unwrap().median, 2.5);
        assert!(stat(&[]).is_none());
    }

    #[test]
    fn markdown_gives_ratios_to_direct_and_ignores_warmups() {
        let samples = [
            sample(Contender::Direct, 20.0, false),
            sample(Contender::BerthSplice, 10.0, false),
            sample(Contender::BerthSplice, 15.0, false),
            sample(Contender::BerthSplice, 999.0, true),
        ];
        let md = markdown(&samples, &["gbit_s"]);
        assert!(md.contains("| direct | 20.00 | 1.00 |"), "{md}");
        assert!(
            md.contains("| berth-splice | 12.50 (10.00–15.00) | 0.62 |"),
            "{md}"
        );
        assert!(!md.contains("999"), "warm-up leaked: {md}");
    }

    #[test]
    fn markdown_omits_the_ratio_without_direct() {
        let md = markdown(&[sample(Contender::Socat, 1.0, false)], &["gbit_s"]);
        assert!(!md.contains("× direct"), "{md}");
    }
}
