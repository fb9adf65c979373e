//! SVG charts (plotters): throughput, latency and connection rate, as grouped bars of one
//! metric per contender and series.
use std::path::Path;

use anyhow::anyhow;
use plotters::prelude::*;

use crate::{contender::Contender, metric::Metric, plan::Scenario, report::Sample};

/// Draws grouped vertical bars: one group per contender, one bar per series.
pub(crate) fn grouped_bars(
    path: &Path,
    title: &str,
    y_label: &str,
    groups: &[&str],
    series: &[(String, Vec<Option<f64>>)],
) -> anyhow::Result<()> {
    if groups.is_empty() || series.is_empty() {
        return Ok(());
    }
    let max = series
        .iter()
        .flat_map(|(_, v)| v.iter().flatten())
        .copied()
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.15;
    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let n = groups.len();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(60)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..n as f64, 0f64..max)
        .map_err(|e| anyhow!("{e}"))?;
    let labels: Vec<String> = groups.iter().map(|s| (*s).to_owned()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 && i < labels.len() {
                labels[i].clone()
            } else {
                String::new()
            }
        })
        .y_desc(y_label)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    let width = 0.8 / series.len() as f64;
    for (si, (name, values)) in series.iter().enumerate() {
        let color = Palette99::pick(si).to_rgba();
        let bars: Vec<Rectangle<(f64, f64)>> = values
            .iter()
            .enumerate()
            .filter_map(|(gi, v)| v.map(|v| (gi, v)))
            .map(|(gi, v)| {
                let x0 = gi as f64 + 0.1 + si as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width * 0.95, v)], color.filled())
            })
            .collect();
        chart
            .draw_series(bars)
            .map_err(|e| anyhow!("{e}"))?
            .label(name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperMiddle)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// Throughput, latency and connection-rate charts from the medians.
pub(crate) fn all(out: &Path, samples: &[Sample]) -> anyhow::Result<()> {
    let grouped = crate::report::group(samples);
    let median = |scenario: Scenario, variant: &str, c: Contender, m: Metric| {
        grouped
            .iter()
            .find(|((s, v), _)| *s == scenario && v == variant)
            .and_then(|(_, per)| per.get(&c))
            .and_then(|x| x.get(&m))
            .and_then(|v| crate::report::stat(v))
            .map(|s| s.median)
    };
    let contenders: Vec<Contender> = Contender::ALL
        .into_iter()
        .filter(|c| samples.iter().any(|s| s.contender == *c))
        .collect();
    let names: Vec<&str> = contenders.iter().map(|c| c.name()).collect();
    let variants = |scenario: Scenario| -> Vec<String> {
        let mut v: Vec<String> = grouped
            .iter()
            .filter(|((s, _), _)| *s == scenario)
            .map(|((_, v), _)| v.clone())
            .collect();
        v.dedup();
        v
    };
    let series_of = |scenario: Scenario, metric: Metric| -> Vec<(String, Vec<Option<f64>>)> {
        variants(scenario)
            .into_iter()
            .map(|v| {
                let values = contenders
                    .iter()
                    .map(|c| median(scenario, &v, *c, metric))
                    .collect();
                (v, values)
            })
            .filter(|(_, vals): &(String, Vec<Option<f64>>)| vals.iter().any(Option::is_some))
            .collect()
    };
    grouped_bars(
        &out.join("throughput.svg"),
        "Bulk throughput (median)",
        "Gbit/s",
        &names,
        &series_of(Scenario::Bulk, Metric::GbitPerSec),
    )?;
    let rr: Vec<(String, Vec<Option<f64>>)> = [
        (Metric::P50Us, "p50"),
        (Metric::P99Us, "p99"),
        (Metric::P999Us, "p99.9"),
    ]
    .iter()
    .map(|(m, label)| {
        (
            (*label).to_owned(),
            contenders
                .iter()
                .map(|c| {
                    variants(Scenario::Rr)
                        .first()
                        .and_then(|v| median(Scenario::Rr, v, *c, *m))
                })
                .collect(),
        )
    })
    .collect();
    grouped_bars(
        &out.join("latency.svg"),
        "64 B request/response latency (median of runs)",
        "µs",
        &names,
        &rr,
    )?;
    let mut crr = series_of(Scenario::Crr, Metric::ConnPerSec);
    crr.extend(
        series_of(Scenario::External, Metric::ConnPerSec)
            .into_iter()
            .map(|(v, x)| (format!("external: {v}"), x)),
    );
    grouped_bars(
        &out.join("crr.svg"),
        "Connection rate (median)",
        "connections/s",
        &names,
        &crr,
    )?;
    Ok(())
}
