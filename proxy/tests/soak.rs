//! The soak run behind `cargo xtask soak --minutes N`: `berth run` in a lab namespace under
//! a mixed, bounded load for N minutes (bulk and short TCP connections through splice,
//! sockmap and kernel mode; UDP flows through the relay and kernel mode; clients reset
//! mid-transfer; a reload every few seconds; runtime mappings added and removed), every
//! transfer checksummed. Once a second it samples the daemon's memory, descriptors and
//! threads, the BPF maps' entries and the namespace's socket memory; after a warm-up, a line
//! fitted to each series must not climb. The slope check itself is tested without root.
#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking, with the stack trace"
)]
mod common;

use std::{
    collections::HashMap,
    fmt::Write as _,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use common::{
    EXT_HOST, HANG, Tally, assert_mirrored,
    bpf::map_entries_of,
    daemon::{Dir, scrape_in},
    exchange,
    lab::Lab,
    udp_ask,
};
use rand::Rng as _;
use tokio::{
    io::AsyncWriteExt as _,
    sync::mpsc,
    time::{Instant, timeout},
};

/// How long the load runs, in seconds (`cargo xtask soak` sets it).
const SECS_ENV: &str = "BERTH_SOAK_SECS";
/// Where to write the samples and the verdicts, as JSON (`cargo xtask soak` sets it).
const REPORT_ENV: &str = "BERTH_SOAK_REPORT";

/// One resource the soak watches, and how much it may still drift once the load is steady:
/// the fitted line's rise over the steady window must stay under `abs + rel × mean`.
struct Watched {
    name: &'static str,
    abs: f64,
    rel: f64,
}

const WATCHED: [Watched; 8] = [
    Watched {
        name: "rss_kib",
        abs: 4096.0,
        rel: 0.10,
    },
    Watched {
        name: "fds",
        abs: 16.0,
        rel: 0.10,
    },
    Watched {
        name: "threads",
        abs: 2.0,
        rel: 0.0,
    },
    Watched {
        name: "sockmap_entries",
        abs: 16.0,
        rel: 0.10,
    },
    Watched {
        name: "conntrack_entries",
        abs: 64.0,
        rel: 0.10,
    },
    Watched {
        name: "revnat_entries",
        abs: 64.0,
        rel: 0.10,
    },
    // The kernel's TCP memory is the whole machine's, in-flight bulk data included: it
    // swings by megabytes from one second to the next.
    Watched {
        name: "tcp_mem_pages",
        abs: 2048.0,
        rel: 0.25,
    },
    Watched {
        name: "udp_mem_pages",
        abs: 64.0,
        rel: 0.10,
    },
];

/// The least-squares slope of `values` over `times` (units per second).
fn slope(times: &[f64], values: &[f64]) -> f64 {
    let n = times.len() as f64;
    let (mt, mv) = (
        times.iter().sum::<f64>() / n,
        values.iter().sum::<f64>() / n,
    );
    let (mut num, mut den) = (0.0, 0.0);
    for (t, v) in times.iter().zip(values) {
        num += (t - mt) * (v - mv);
        den += (t - mt) * (t - mt);
    }
    if den == 0.0 { 0.0 } else { num / den }
}

/// What a series did: its first value, its median once steady, its last value, and the
/// fitted rise over the steady window (after the first `warmup` seconds).
#[derive(Debug, serde::Serialize)]
struct Verdict {
    name: &'static str,
    start: f64,
    steady: f64,
    end: f64,
    rise: f64,
    allowed: f64,
}

impl Verdict {
    fn of(w: &Watched, times: &[f64], values: &[f64], warmup: f64) -> Self {
        let from = times.iter().position(|&t| t >= warmup).unwrap_or(0);
        // A 5-sample running median first: one burst at the end of the window must not
        // tilt the line.
        let smooth: Vec<f64> = (0..values.len())
            .map(|i| {
                let mut w = values[i.saturating_sub(2)..(i + 3).min(values.len())].to_vec();
                w.sort_by(f64::total_cmp);
                w[w.len() / 2]
            })
            .collect();
        let (t, v) = (&times[from..], &smooth[from..]);
        let mut sorted = v.to_vec();
        sorted.sort_by(f64::total_cmp);
        let steady = sorted[sorted.len() / 2];
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        Self {
            name: w.name,
            start: values[0],
            steady,
            end: *values.last().unwrap(),
            rise: slope(t, v) * (t.last().unwrap() - t[0]),
            allowed: w.abs + w.rel * mean,
        }
    }

    fn grows(&self) -> bool {
        self.rise > self.allowed
    }
}

#[test]
fn a_fitted_slope_flags_steady_growth_and_not_noise() {
    let times: Vec<f64> = (0..120).map(f64::from).collect();
    let fds = &WATCHED[1];
    // Noisy but flat after a warm-up that climbs.
    let flat: Vec<f64> = times
        .iter()
        .map(|&t| {
            if t < 30.0 {
                t * 2.0
            } else {
                60.0 + (t * 7.0 % 11.0) - 5.0
            }
        })
        .collect();
    assert!(!Verdict::of(fds, &times, &flat, 40.0).grows());
    // A leak of one descriptor every 3 seconds hides in the noise of single samples, not
    // in the fitted line.
    let leak: Vec<f64> = flat.iter().zip(&times).map(|(v, t)| v + t / 3.0).collect();
    let v = Verdict::of(fds, &times, &leak, 40.0);
    assert!(v.grows(), "{v:?}");
    assert!((slope(&times, &times) - 1.0).abs() < 1e-9);
}

/// One sample of every watched resource, in [`WATCHED`]'s order.
fn sample(pid: u32) -> [f64; 8] {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> f64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap()
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as f64;
    // berth's namespace: the lab's host.
    let sockstat = std::fs::read_to_string(format!("/proc/{pid}/net/sockstat")).unwrap();
    let mem = |proto: &str| -> f64 {
        sockstat
            .lines()
            .find(|l| l.starts_with(proto))
            .and_then(|l| l.split_whitespace().skip_while(|w| *w != "mem").nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    [
        field("VmRSS:"),
        fds,
        field("Threads:"),
        map_entries_of(pid, "BERTH_SOCKS") as f64,
        map_entries_of(pid, "BERTH_DNAT_CT") as f64,
        map_entries_of(pid, "BERTH_DNAT_REV") as f64,
        mem("TCP:"),
        mem("UDP:"),
    ]
}

/// Transfers checked on both ends, and failures seen by the load.
#[derive(Default)]
struct Counts {
    transfers: AtomicU64,
    resets: AtomicU64,
    datagrams: AtomicU64,
    reloads: AtomicU64,
    runtime: AtomicU64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: run by `cargo xtask soak --minutes N`"]
async fn soak() {
    common::require_root();
    let secs: u64 = std::env::var(SECS_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    let lab = Arc::new(Lab::up(2).await);
    // Runtime mappings bind their ports again and again: outside the ephemeral range, so
    // that no other socket of the namespace can hold one in between.
    lab.host.narrow_ephemeral_ports();
    let (tcp, mut seen) = lab.tcp_server(0);
    let (other, mut seen_other) = lab.tcp_server(0);
    let udp = lab.udp_server(1);
    let port = |_| lab.host.free_port();
    let ports: Vec<u16> = (0..6).map(port).collect();
    let metrics = SocketAddr::from(([127, 0, 0, 1], lab.host.free_port()));
    let any = |p: u16| SocketAddr::from(([0, 0, 0, 0], p));
    let base = format!(
        "[metrics]\nlisten = \"{metrics}\"\n[dnat]\ncgroup = \"{}\"\nclosing_timeout = 0.2\nudp_timeout = 0.5\n{}{}{}{}{}",
        lab.cgroup.0.display(),
        common::daemon::mapping("splice", any(ports[0]), tcp, "mode = \"splice\""),
        common::daemon::mapping("sockmap", any(ports[1]), tcp, "mode = \"sockmap\""),
        common::daemon::mapping("kernel", any(ports[2]), tcp, "mode = \"dnat\""),
        common::daemon::mapping(
            "udp",
            any(ports[3]),
            udp,
            "proto = \"udp\"\nudp_idle_timeout = 2"
        ),
        common::daemon::mapping(
            "kernel-udp",
            any(ports[4]),
            udp,
            "proto = \"udp\"\nmode = \"dnat\""
        ),
    );
    // A mapping that each reload changes (its target moves between two servers).
    let churn = |to: SocketAddr| {
        format!(
            "{base}{}",
            common::daemon::mapping("churn", any(ports[5]), to, "")
        )
    };
    let dir = Dir::new();
    let berth = Arc::new(lab.berth(&dir, &churn(tcp)));
    berth.up().await;
    let pid = berth.child.id();
    let public = |p: u16| SocketAddr::from((EXT_HOST, p));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let counts = Arc::new(Counts::default());
    let ids = Arc::new(AtomicU64::new(1));

    // Client halves of the checked transfers go here; the servers report theirs on `seen`.
    let (done_tx, mut done) = mpsc::unbounded_channel::<(u64, Tally)>();
    let mut load = common::Tasks(Vec::new());
    for (p, max) in [
        (ports[0], 2 << 20),
        (ports[1], 2 << 20),
        (ports[2], 2 << 20),
        (ports[0], 200),
        (ports[2], 200),
        (ports[5], 64 << 10),
    ] {
        let sock = lab.ext.ns.clone();
        let (done_tx, ids) = (done_tx.clone(), ids.clone());
        load.0.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let (up, down) = {
                    let mut rng = rand::rng();
                    (rng.random_range(0..max), rng.random_range(0..max))
                };
                let s = common::tcp_socket_in(&sock, None, public(p));
                let s = timeout(HANG, s.connect(public(p))).await.unwrap().unwrap();
                let id = ids.fetch_add(1, Relaxed);
                let tally = timeout(HANG, exchange(s, id, up, down))
                    .await
                    .unwrap()
                    .unwrap_or_else(|e| panic!("transfer {id} through port {p}: {e}"));
                let _ = done_tx.send((id, tally));
            }
        }));
    }
    // Local clients of the kernel-mode mapping (in the cgroup, through 127.0.0.1).
    {
        let (lab, done_tx, ids) = (lab.clone(), done_tx.clone(), ids.clone());
        let local = SocketAddr::from(([127, 0, 0, 1], ports[2]));
        load.0.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let s = lab.local_socket(false);
                let s = timeout(HANG, s.connect(local)).await.unwrap().unwrap();
                let id = ids.fetch_add(1, Relaxed);
                let tally = timeout(HANG, exchange(s, id, 4096, 4096))
                    .await
                    .unwrap()
                    .unwrap_or_else(|e| panic!("local transfer {id}: {e}"));
                let _ = done_tx.send((id, tally));
            }
        }));
    }
    // Clients that reset in the middle of a transfer.
    {
        let (ns, counts) = (lab.ext.ns.clone(), counts.clone());
        let targets = [ports[0], ports[1], ports[2]];
        load.0.push(tokio::spawn(async move {
            let mut i = 0;
            while Instant::now() < deadline {
                let p = targets[i % targets.len()];
                i += 1;
                let s = common::tcp_socket_in(&ns, None, public(p));
                let mut s = timeout(HANG, s.connect(public(p))).await.unwrap().unwrap();
                let mut header = [0u8; 16];
                header[8..].copy_from_slice(&(1u64 << 30).to_be_bytes());
                s.write_all(&header).await.unwrap();
                s.write_all(&[7; 65_536]).await.unwrap();
                socket2::SockRef::from(&s)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
                drop(s);
                counts.resets.fetch_add(1, Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }
    // UDP: new flows (a new socket each time) and kept ones, through both modes.
    for p in [ports[3], ports[4]] {
        let (ns, counts) = (lab.ext.ns.clone(), counts.clone());
        load.0.push(tokio::spawn(async move {
            let kept = common::udp_socket_in(&ns);
            let mut i = 0u64;
            while Instant::now() < deadline {
                i += 1;
                let fresh;
                let sock = if i.is_multiple_of(2) {
                    &kept
                } else {
                    fresh = common::udp_socket_in(&ns);
                    &fresh
                };
                let (reply, _) = udp_ask(sock, public(p)).await;
                assert!(reply.starts_with("ping from"), "{reply}");
                counts.datagrams.fetch_add(1, Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    // A reload every 3 s, each changing the churn mapping.
    {
        let (berth, counts) = (berth.clone(), counts.clone());
        let configs = [churn(other), churn(tcp)];
        load.0.push(tokio::spawn(async move {
            let mut i = 0;
            while Instant::now() + Duration::from_secs(3) < deadline {
                tokio::time::sleep(Duration::from_secs(3)).await;
                let r = berth.reload(&configs[i % 2]).await;
                assert!(r.ok, "reload: {}", r.message);
                i += 1;
                counts.reloads.fetch_add(1, Relaxed);
            }
        }));
    }
    // Runtime mappings: added, used once, removed, every second.
    {
        let (berth, counts, ns, ids, done_tx) = (
            berth.clone(),
            counts.clone(),
            lab.ext.ns.clone(),
            ids.clone(),
            done_tx.clone(),
        );
        let free: Vec<u16> = (0..4).map(|_| lab.host.fixed_port()).collect();
        load.0.push(tokio::spawn(async move {
            let mut i = 0;
            while Instant::now() < deadline {
                let p = free[i % free.len()];
                i += 1;
                let add = format!(
                    "{{\"op\":\"add\",\"owner\":\"soak\",\"lease\":false,\"mapping\":{{\"name\":\"rt\",\"listen\":\"0.0.0.0:{p}\",\"target\":\"{tcp}\"}}}}"
                );
                let r = berth.request(&add).await;
                assert!(r.ok, "add: {}", r.message);
                let s = common::tcp_socket_in(&ns, None, public(p));
                let s = timeout(HANG, s.connect(public(p))).await.unwrap().unwrap();
                let id = ids.fetch_add(1, Relaxed);
                let tally = timeout(HANG, exchange(s, id, 4096, 4096)).await.unwrap().unwrap();
                let _ = done_tx.send((id, tally));
                let r = berth.request("{\"op\":\"remove\",\"name\":\"rt\"}").await;
                assert!(r.ok, "remove: {}", r.message);
                counts.runtime.fetch_add(1, Relaxed);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }));
    }
    drop(done_tx);

    // Pair both ends of every transfer; sample once a second meanwhile.
    let start = Instant::now();
    let mut times = Vec::new();
    let mut series: Vec<Vec<f64>> = vec![Vec::new(); WATCHED.len()];
    let mut clients: HashMap<u64, Tally> = HashMap::new();
    let mut servers: HashMap<u64, Tally> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let check = |id: u64, clients: &mut HashMap<u64, Tally>, servers: &mut HashMap<u64, Tally>| {
        if let (Some(c), Some(s)) = (clients.get(&id), servers.get(&id)) {
            assert_mirrored(id, c, s);
            clients.remove(&id);
            servers.remove(&id);
            counts.transfers.fetch_add(1, Relaxed);
        }
    };
    let mut clients_open = true;
    while clients_open || Instant::now() < deadline {
        tokio::select! {
            d = done.recv(), if clients_open => match d {
                Some((id, tally)) => { clients.insert(id, tally); check(id, &mut clients, &mut servers); }
                None => clients_open = false,
            },
            Some((_, id, tally)) = seen.recv() => { servers.insert(id, tally); check(id, &mut clients, &mut servers); }
            Some((_, id, tally)) = seen_other.recv() => { servers.insert(id, tally); check(id, &mut clients, &mut servers); }
            _ = tick.tick() => {
                times.push(start.elapsed().as_secs_f64());
                for (s, v) in series.iter_mut().zip(sample(pid)) {
                    s.push(v);
                }
                // Metrics are scraped under load too.
                scrape_in(&lab.host.ns, metrics).await;
            }
        }
        if !clients_open && Instant::now() >= deadline {
            break;
        }
    }
    for t in std::mem::take(&mut load.0) {
        timeout(HANG, t).await.unwrap().unwrap();
    }
    // The server halves of the last transfers.
    while !clients.is_empty() {
        let (_, id, tally) = timeout(HANG, async {
            tokio::select! {
                Some(x) = seen.recv() => x,
                Some(x) = seen_other.recv() => x,
            }
        })
        .await
        .expect("a transfer's server half never came");
        servers.insert(id, tally);
        check(id, &mut clients, &mut servers);
    }

    let warmup = (secs as f64 / 3.0).min(300.0);
    let verdicts: Vec<Verdict> = WATCHED
        .iter()
        .zip(&series)
        .map(|(w, v)| Verdict::of(w, &times, v, warmup))
        .collect();
    let mut table = format!(
        "soak: {secs} s, {} checked transfers, {} resets, {} UDP round trips, {} reloads, {} runtime mappings\n| resource | start | steady (median) | end | fitted rise | allowed |\n|---|---|---|---|---|---|\n",
        counts.transfers.load(Relaxed),
        counts.resets.load(Relaxed),
        counts.datagrams.load(Relaxed),
        counts.reloads.load(Relaxed),
        counts.runtime.load(Relaxed),
    );
    for v in &verdicts {
        writeln!(
            table,
            "| {} | {:.0} | {:.0} | {:.0} | {:+.1} | {:.1} |",
            v.name, v.start, v.steady, v.end, v.rise, v.allowed
        )
        .unwrap();
    }
    println!("{table}");
    if let Ok(path) = std::env::var(REPORT_ENV) {
        let report = serde_json::json!({
            "seconds": secs,
            "warmup": warmup,
            "transfers": counts.transfers.load(Relaxed),
            "verdicts": verdicts,
            "times": times,
            "series": WATCHED.iter().map(|w| w.name).zip(&series).collect::<HashMap<_, _>>(),
            "table": table,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    }
    assert!(counts.transfers.load(Relaxed) > 0, "no transfer completed");
    let growing: Vec<&Verdict> = verdicts.iter().filter(|v| v.grows()).collect();
    assert!(
        growing.is_empty(),
        "still growing once steady: {growing:?}\n{table}"
    );
    Arc::into_inner(berth).unwrap().stop().await;
}
