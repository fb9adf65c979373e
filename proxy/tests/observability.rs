//! The shipped Grafana dashboard and Prometheus alert rules agree with what berth exports:
//! every metric they query is a family berth has, the rules pass `promtool check rules`, and
//! their unit tests (`berth-rules.test.yml`) pass `promtool test rules`. No root needed;
//! promtool is unpacked from Debian's `prometheus` package by `cargo xtask setup`.
#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking, with the stack trace"
)]

use std::{
    path::{Path, PathBuf},
    process::Command,
};

fn dist() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("dist")
}

/// The metric names an expression uses: identifiers of berth's and the process collector's.
fn metrics_in(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.starts_with("berth_") || w.starts_with("process_"))
        .map(str::to_owned)
        .collect()
}

/// Whether `name` is one of berth's families, or a series of one of its histograms.
fn exported(name: &str, families: &[String]) -> bool {
    families.iter().any(|f| f == name)
        || ["_bucket", "_sum", "_count"].iter().any(|s| {
            name.strip_suffix(s)
                .is_some_and(|base| families.iter().any(|f| f == base))
        })
}

/// Every `expr` and `query` string in a JSON document.
fn json_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr" | "query", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => json_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| json_exprs(v, out)),
        _ => {}
    }
}

#[test]
fn the_dashboard_queries_only_metrics_berth_exports_and_shows_the_main_ones() {
    let families = berth::service::family_names();
    let text = std::fs::read_to_string(dist().join("grafana/berth.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut exprs = Vec::new();
    json_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() > 20, "{exprs:?}");
    let used: Vec<String> = exprs.iter().flat_map(|e| metrics_in(e)).collect();
    for name in &used {
        assert!(
            exported(name, &families),
            "the dashboard queries {name}, which berth does not export"
        );
    }
    // And it shows every family of the mappings and the process that an operator reads.
    for family in families.iter().filter(|f| f.as_str() != "berth_build_info") {
        let shown = used
            .iter()
            .any(|u| u == family || u.starts_with(&format!("{family}_")));
        let process_extra = family.starts_with("process_")
            && ![
                "process_cpu_seconds_total",
                "process_resident_memory_bytes",
                "process_open_fds",
                "process_max_fds",
            ]
            .contains(&family.as_str());
        assert!(
            shown || process_extra,
            "the dashboard does not show {family}"
        );
    }
}

/// The promtool `cargo xtask setup` unpacked, else one on the PATH.
fn promtool(args: &[&str]) -> String {
    let unpacked =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/prometheus/usr/bin/promtool");
    let program = if unpacked.exists() {
        unpacked
    } else {
        PathBuf::from("promtool")
    };
    let out = Command::new(program)
        .args(args)
        .current_dir(dist().join("prometheus"))
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "promtool: {e} (`cargo xtask setup` unpacks it from Debian's prometheus package)"
            )
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn the_alert_rules_check_and_their_unit_tests_pass() {
    let families = berth::service::family_names();
    let text = std::fs::read_to_string(dist().join("prometheus/berth-rules.yml")).unwrap();
    let rules: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let mut alerts = Vec::new();
    for rule in rules["groups"][0]["rules"].as_sequence().unwrap() {
        let expr = rule["expr"].as_str().unwrap();
        for name in metrics_in(expr) {
            assert!(
                exported(&name, &families),
                "a rule queries {name}, which berth does not export"
            );
        }
        alerts.push(rule["alert"].as_str().unwrap().to_owned());
    }
    // Each alert has a unit test that fires it.
    let tests = std::fs::read_to_string(dist().join("prometheus/berth-rules.test.yml")).unwrap();
    for alert in &alerts {
        assert!(
            tests.contains(&format!("alertname: {alert}")),
            "no unit test fires {alert}"
        );
    }
    let checked = promtool(&["check", "rules", "berth-rules.yml"]);
    assert!(
        checked.contains(&format!("SUCCESS: {} rules found", alerts.len())),
        "{checked}"
    );
    promtool(&["test", "rules", "berth-rules.test.yml"]);
}
