//! Turning samples into the Markdown tables and the JSON file.
use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use serde::Serialize;

use crate::{
    chart,
    contender::{Contender, Tools},
    host,
    metric::{Metric, Metrics},
    plan::{Plan, Scenario},
};

/// One measurement of one contender in one scenario variant.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Sample {
    pub(crate) scenario: Scenario,
    pub(crate) variant: String,
    pub(crate) contender: Contender,
    pub(crate) rep: u32,
    /// Warm-up samples are recorded in the JSON but left out of every summary.
    pub(crate) warmup: bool,
    pub(crate) metrics: Metrics,
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
    (Scenario, String),
    BTreeMap<Contender, BTreeMap<Metric, Vec<f64>>>,
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
            per.entry(*m).or_default().push(*v);
        }
    }
    out
}

/// Everything a run produced, for the report.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    pub(crate) samples: Vec<Sample>,
    pub(crate) skipped: Vec<(String, String)>,
    pub(crate) retried: Vec<String>,
    pub(crate) failures: Vec<String>,
    /// Failed samples of berth or direct: a bug here or in berth, which fails the run.
    pub(crate) own_failures: usize,
}

/// Writes results.md (also printed), results.json and the charts into `out`.
pub(crate) fn write(
    out: &Path,
    quick: bool,
    plan: &Plan,
    tools: &Tools,
    outcome: &Outcome,
) -> anyhow::Result<()> {
    let Outcome {
        samples,
        skipped,
        retried,
        failures,
        ..
    } = outcome;
    let machine = host::machine();
    let versions = host::versions(tools);
    let mut md = format!(
        "## berth-bench results ({})\n\nMachine: {}. Date: {}.\n\nVersions: {}.\n\nEach cell is the median of {} run(s), with min–max when there are several; `× direct` is the ratio to `direct` measured in the same run.\n",
        if quick {
            "quick run: rough numbers"
        } else {
            "full run"
        },
        machine
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", "),
        host::today(),
        versions
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join("; "),
        plan.reps,
    );
    md.push_str(&markdown(samples));
    if !skipped.is_empty() {
        md.push_str("\nSkipped:\n");
        for (who, why) in skipped {
            md.push_str(&format!("- {who}: {why}\n"));
        }
    }
    if !retried.is_empty() {
        md.push_str("\nSamples that failed once and succeeded on retry:\n");
        for r in retried {
            md.push_str(&format!("- {r}\n"));
        }
    }
    if !failures.is_empty() {
        md.push_str("\nFailed samples (a contender that cannot do the job fails its sample; berth or direct failing fails the run):\n");
        for f in failures {
            md.push_str(&format!("- {f}\n"));
        }
    }
    println!("{md}");
    std::fs::write(out.join("results.md"), &md)?;
    let json = serde_json::json!({ "machine": machine, "versions": versions, "plan": plan, "samples": samples, "skipped": skipped, "retried": retried, "failures": failures });
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    chart::all(out, samples)?;
    eprintln!("wrote {}/results.md, results.json and *.svg", out.display());
    Ok(())
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
pub(crate) fn markdown(samples: &[Sample]) -> String {
    let mut md = String::new();
    for ((scenario, variant), per) in group(samples) {
        let metrics: Vec<Metric> = Metric::ALL
            .into_iter()
            .filter(|m| per.values().any(|c| c.contains_key(m)))
            .collect();
        let Some(&headline) = metrics.first() else {
            continue;
        };
        let direct_stat = per
            .get(&Contender::Direct)
            .and_then(|c| c.get(&headline))
            .and_then(|v| stat(v));
        let direct = direct_stat.map(|s| s.median);
        let mut flagged = false;
        let _ = writeln!(md, "\n### {scenario}: {variant}\n");
        let mut header = format!("| contender | {} (median, min–max) |", headline.label());
        if direct.is_some() {
            header.push_str(" × direct |");
        }
        for m in &metrics[1..] {
            let _ = write!(header, " {} |", m.label());
        }
        let cols = header.matches('|').count() - 1;
        let _ = writeln!(md, "{header}\n|{}", "---|".repeat(cols));
        for (contender, values) in &per {
            let cell = |m: Metric| match values.get(&m).and_then(|v| stat(v)) {
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
                let mine = values.get(&headline).and_then(|v| stat(v));
                let ratio = mine.map(|s| s.median / d);
                let suspect = *contender != Contender::Direct
                    && mine.zip(direct_stat).is_some_and(|(c, d)| {
                        beats_beyond_spread(c, d, headline.higher_is_better())
                    });
                flagged |= suspect;
                let _ = write!(
                    row,
                    " {}{} |",
                    ratio.map_or("–".to_owned(), |r| format!("{r:.2}")),
                    if suspect { " ⚠" } else { "" }
                );
            }
            for m in &metrics[1..] {
                let _ = write!(row, " {} |", cell(*m));
            }
            let _ = writeln!(md, "{row}");
        }
        if flagged {
            let _ = writeln!(
                md,
                "\n⚠ better than `direct` beyond both spreads (and by more than 2%): a contender \
                 adds work to direct's path and cannot be faster, so this is an artefact of the \
                 method (where client, server, softirq and proxy ran) until explained."
            );
        }
    }
    md
}

/// Whether `c` beats `direct` with no overlap of their min–max spreads (a single sample is
/// its own spread) and by more than 2% of direct's median.
fn beats_beyond_spread(c: Stat, direct: Stat, higher_is_better: bool) -> bool {
    let margin = direct.median.abs() * 0.02;
    if higher_is_better {
        c.min > direct.max && c.median > direct.median + margin
    } else {
        c.max < direct.min && c.median < direct.median - margin
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(c: Contender, v: f64, warmup: bool) -> Sample {
        Sample {
            scenario: Scenario::Bulk,
            variant: "1 stream".into(),
            contender: c,
            rep: 1,
            warmup,
            metrics: Metrics::from([(Metric::GbitPerSec, v)]),
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
        let md = markdown(&samples);
        assert!(md.contains("| direct | 20.00 | 1.00 |"), "{md}");
        assert!(
            md.contains("| berth-splice | 12.50 (10.00–15.00) | 0.62 |"),
            "{md}"
        );
        assert!(!md.contains("999"), "warm-up leaked: {md}");
    }

    #[test]
    fn a_contender_faster_than_direct_beyond_the_spread_is_flagged() {
        let samples = [
            sample(Contender::Direct, 20.0, false),
            sample(Contender::Direct, 21.0, false),
            // Beyond both spreads: flagged.
            sample(Contender::IptablesDnat, 30.0, false),
            sample(Contender::IptablesDnat, 32.0, false),
            // Better median, overlapping spreads: not flagged.
            sample(Contender::BerthDnat, 20.5, false),
            sample(Contender::BerthDnat, 22.0, false),
        ];
        let md = markdown(&samples);
        assert!(
            md.contains("| iptables-dnat | 31.00 (30.00–32.00) | 1.51 ⚠ |"),
            "{md}"
        );
        assert!(
            md.contains("| berth-dnat | 21.25 (20.50–22.00) | 1.04 |"),
            "{md}"
        );
        assert!(md.contains("artefact of the method"), "{md}");
        let lower = |p50: f64| Stat {
            median: p50,
            min: p50,
            max: p50,
            n: 1,
        };
        assert!(beats_beyond_spread(lower(30.0), lower(80.0), false));
        assert!(!beats_beyond_spread(lower(79.0), lower(80.0), false));
    }

    #[test]
    fn markdown_omits_the_ratio_without_direct() {
        let md = markdown(&[sample(Contender::Socat, 1.0, false)]);
        assert!(!md.contains("× direct"), "{md}");
    }
}
