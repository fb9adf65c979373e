//! Running the jobs: every eligible contender, interleaved per repetition (A B C, A B C, …)
//! so that drift hits every contender alike, one retry per failed sample, and progress.
use indicatif::{ProgressBar, ProgressStyle};

use crate::{
    contender::Contender,
    measure::{self, Env},
    metric::Metric,
    plan::{Job, Scenario},
    report::{Outcome, Sample},
};

/// Runs `jobs` with the `available` contenders; `skipped` already lists the contenders that
/// could not run at all.
pub(crate) fn run(
    jobs: &[Job],
    available: &[Contender],
    mut skipped: Vec<(String, String)>,
    env: &Env<'_>,
) -> anyhow::Result<Outcome> {
    let plan = env.plan;
    let reps: Vec<(u32, bool)> = (if plan.warmup { Some((0, true)) } else { None })
        .into_iter()
        .chain((1..=plan.reps).map(|r| (r, false)))
        .collect();
    let total: f64 = jobs
        .iter()
        .map(|j| {
            available.iter().filter(|c| j.eligible(**c).is_ok()).count() as f64
                * j.estimate_secs(plan)
                * if j.once() { 1.0 } else { reps.len() as f64 }
        })
        .sum();
    let bar = ProgressBar::new(total.ceil() as u64);
    bar.set_style(ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {percent:>3}% ETA {eta} {msg}",
    )?);

    let mut out = Outcome::default();
    for job in jobs {
        for c in available {
            // A TCP-only or UDP-only contender sitting out the other protocol is no news.
            if let Err(why) = job.eligible(*c)
                && !why.ends_with(" only")
            {
                // Once per scenario, not once per job of it.
                let entry = (
                    format!("{} in {}", c.name(), job.scenario()),
                    why.to_owned(),
                );
                if !skipped.contains(&entry) {
                    skipped.push(entry);
                }
            }
        }
        for &(rep, warmup) in &reps {
            if job.once() && (warmup || rep > 1) {
                continue;
            }
            for &c in available.iter().filter(|c| job.eligible(**c).is_ok()) {
                bar.set_message(format!(
                    "{} · {} · {}",
                    job.scenario(),
                    c.name(),
                    if warmup {
                        "warm-up".into()
                    } else {
                        format!("rep {rep}/{}", plan.reps)
                    }
                ));
                let what = || format!("{} / {} / {}", job.scenario(), job.variant(plan), c.name());
                // One retry, reported: a single transient failure should not void a long run.
                let slot = measure::slot(c, rep);
                let result = measure::take(*job, c, slot, env).or_else(|first| {
                    bar.println(format!("{} failed, retrying once: {first:#}", what()));
                    let second = measure::take(*job, c, slot, env);
                    if second.is_ok() {
                        out.retried
                            .push(format!("{} (rep {rep}): {first:#}", what()));
                    }
                    second
                });
                match result {
                    Ok(metrics) => out.samples.push(Sample {
                        scenario: job.scenario(),
                        variant: job.variant(plan),
                        contender: c,
                        rep,
                        warmup,
                        metrics,
                    }),
                    Err(e) => {
                        bar.println(format!("{} failed: {e:#}", what()));
                        // berth's own or the baseline's failure is a bug here or in berth;
                        // another contender failing (docker-proxy out of fds) is a result.
                        if c.is_own() {
                            out.own_failures += 1;
                        }
                        out.failures.push(format!("{}: {e:#}", what()));
                    }
                }
                bar.inc(job.estimate_secs(plan).round() as u64);
            }
        }
    }
    bar.finish_and_clear();
    out.skipped = skipped;
    Ok(out)
}

/// The cpu scenario: the bulk runs seen through their CPU columns.
pub(crate) fn cpu_samples(samples: &[Sample]) -> Vec<Sample> {
    samples
        .iter()
        .filter(|s| {
            s.scenario == Scenario::Bulk && s.metrics.contains_key(&Metric::MachineCpuSecsPerGb)
        })
        .map(|s| Sample {
            scenario: Scenario::Cpu,
            metrics: s
                .metrics
                .iter()
                .filter(|(k, _)| matches!(k, Metric::CpuSecsPerGb | Metric::MachineCpuSecsPerGb))
                .map(|(k, v)| (*k, *v))
                .collect(),
            ..s.clone()
        })
        .collect()
}
