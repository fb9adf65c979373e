//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`): every parser that takes
//! outside input, and the pure state machines driven by arbitrary operations against a
//! simple model. Each takes raw bytes and panics only on a bug. The unit tests replay the
//! corpus kept in the repository (`fuzz/corpus/`), so what the fuzzer found stays covered on
//! the stable toolchain.
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    time::Duration,
};

use tokio::time::Instant;

use crate::{
    addr::ClientAddr,
    cni::conf::{self, Attachment, NetConf},
    docker_proxy::{Args, Parsed},
    mapping::{Defaults, Draft, Spec},
    service::{api::Call, config::Config, plan},
    sockmap::allowance::Allowance,
    udp::flows::FlowTable,
};

/// A fuzz target's entry point.
pub type Target = fn(&[u8]);

/// The targets, by the name of their `fuzz/fuzz_targets/*.rs` and corpus directory.
pub const TARGETS: [(&str, Target); 7] = [
    ("config", config),
    ("docker_proxy_args", docker_proxy_args),
    ("admin_line", admin_line),
    ("cni", cni),
    ("flow_table", flow_table),
    ("reload_plan", reload_plan),
    ("allowance", allowance),
];

/// The configuration file: parsing, validation, and a reload onto itself that changes nothing.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = Config::parse(Path::new("fuzz.toml"), text) {
        let running = config.mappings.iter().map(|spec| plan::Current {
            spec,
            degraded: false,
        });
        let p = plan::plan(running, &config.mappings);
        assert_eq!(p.keep.len(), config.mappings.len(), "{p:?}");
    }
}

/// docker-proxy's command line: arguments separated by NUL bytes. What parses gives a draft
/// that the one validator accepts or refuses, never panics on.
pub fn docker_proxy_args(data: &[u8]) {
    let argv = data
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned());
    if let Ok(Parsed::Run(args)) = Args::parse(argv) {
        let listen = args
            .listen
            .unwrap_or_else(|| "0.0.0.0:1".parse().expect("a valid address"));
        let mut draft = args.draft(listen);
        draft.name = Some("fuzz".into());
        let _ = draft.resolve(&Defaults::default());
    }
}

/// The admin socket's line protocol, including the runtime API's mapping drafts.
pub fn admin_line(data: &[u8]) {
    let line = String::from_utf8_lossy(data);
    if let Ok(Call::Add { mapping, owner, .. }) = Call::parse(&line) {
        if let Some(owner) = owner {
            let _ = crate::service::api::check_owner(&owner);
        }
        if let Ok(spec) = mapping.resolve(&Defaults::default()) {
            // A valid mapping survives the wire (runtime mappings are persisted as drafts).
            let json = serde_json::to_string(&*mapping).expect("a draft serializes");
            let again: Draft = serde_json::from_str(&json).expect("a draft parses back");
            assert_eq!(again.resolve(&Defaults::default()), Ok(spec));
        }
    }
}

/// The CNI plugin's input: environment lines (`KEY=VALUE`) up to a NUL byte, then stdin.
pub fn cni(data: &[u8]) {
    let (env, stdin) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&[][..], data),
    };
    let env: HashMap<String, String> = String::from_utf8_lossy(env)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let attachment = Attachment::from_env(|k| env.get(k).cloned());
    let _ = conf::asked_version(stdin);
    let Ok(net) = NetConf::parse(stdin) else {
        return;
    };
    let _ = net.mode();
    let ifname = attachment.map_or_else(|_| "eth0".to_owned(), |a| a.ifname);
    if let Some(prev) = &net.prev_result {
        let _ = conf::container_ips(prev, &ifname);
    }
    if let Ok(drafts) = net.drafts(&ifname) {
        for d in drafts {
            let _ = d.resolve(&Defaults::default());
        }
        let _ = conf::add_result(&net);
    }
}

/// Reads operations from fuzz input, a byte at a time; zeros once it runs out.
struct Ops<'a>(&'a [u8]);

impl Ops<'_> {
    fn byte(&mut self) -> u8 {
        let (&b, rest) = self.0.split_first().unwrap_or((&0, &[]));
        self.0 = rest;
        b
    }

    fn more(&self) -> bool {
        !self.0.is_empty()
    }
}

/// The UDP flow table against a model: a plain list, searched in full for every answer.
pub fn flow_table(data: &[u8]) {
    let mut ops = Ops(data);
    let max = usize::from(ops.byte() % 16) + 1;
    let idle = Duration::from_secs(u64::from(ops.byte() % 32) + 1);
    let mut table: FlowTable<u32> = FlowTable::new(max, idle);
    // (client, value, last seen, order of the last touch)
    let mut model: Vec<(ClientAddr, u32, Instant, u64)> = Vec::new();
    let start = Instant::now();
    let (mut now, mut seq) = (start, 0u64);
    let client = |b: u8| {
        // Four addresses, four ports each: share and eviction policy both come into play.
        let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, b >> 6));
        ClientAddr(SocketAddr::new(ip, u16::from(b & 0x0f)))
    };
    let lru = |flows: &mut dyn Iterator<Item = &(ClientAddr, u32, Instant, u64)>| {
        flows.min_by_key(|f| (f.2, f.3)).map(|f| f.0)
    };
    while ops.more() {
        seq += 1;
        match ops.byte() % 5 {
            0 => now += Duration::from_millis(u64::from(ops.byte()) * 250),
            1 => {
                let c = client(ops.byte());
                let got = table.touch(c, now).copied();
                let want = model.iter_mut().find(|f| f.0 == c).map(|f| {
                    (f.2, f.3) = (now, seq);
                    f.1
                });
                assert_eq!(got, want, "touch {c}");
            }
            2 => {
                let c = client(ops.byte());
                let value = u32::from(ops.byte());
                let existed = model.iter().position(|f| f.0 == c);
                let mut want = None;
                if let Some(i) = existed {
                    model.remove(i);
                } else if model.len() >= max {
                    let share = (max / 2).max(1);
                    let ip = c.get().ip();
                    let own = model.iter().filter(|f| f.0.get().ip() == ip).count();
                    let victim = if own >= share {
                        lru(&mut model.iter().filter(|f| f.0.get().ip() == ip))
                    } else {
                        lru(&mut model.iter())
                    };
                    let i = model
                        .iter()
                        .position(|f| Some(f.0) == victim)
                        .expect("a full table has a victim");
                    let gone = model.remove(i);
                    want = Some((gone.0, gone.1));
                }
                model.push((c, value, now, seq));
                assert_eq!(table.insert(c, value, now), want, "insert {c}");
            }
            3 => {
                let c = client(ops.byte());
                let want = model
                    .iter()
                    .position(|f| f.0 == c)
                    .map(|i| model.remove(i).1);
                assert_eq!(table.remove(c), want, "remove {c}");
            }
            _ => {
                let mut got = table.expire(now);
                let mut want: Vec<(ClientAddr, u32)> = model
                    .iter()
                    .filter(|f| now.saturating_duration_since(f.2) >= idle)
                    .map(|f| (f.0, f.1))
                    .collect();
                model.retain(|f| now.saturating_duration_since(f.2) < idle);
                got.sort_by_key(|f| f.0.get());
                want.sort_by_key(|f| f.0.get());
                assert_eq!(got, want, "expire at {:?}", now - start);
            }
        }
        assert_eq!(table.len(), model.len());
        assert!(table.len() <= max);
        let next = model.iter().map(|f| f.2 + idle).min();
        assert_eq!(table.next_expiry(), next);
    }
}

/// Reload plans: every wanted mapping is kept, started or replaced exactly once; every
/// running one that is not wanted is retired; kept means unchanged.
pub fn reload_plan(data: &[u8]) {
    let mut ops = Ops(data);
    let spec = |b: u8| -> Spec {
        let mut d = Draft::new(
            crate::addr::Proto::Tcp,
            format!("0.0.0.0:{}", 1 + u16::from(b & 3))
                .parse()
                .expect("an address"),
            format!("10.0.0.{}:80", 1 + (b >> 2 & 1))
                .parse()
                .expect("an address"),
        );
        d.name = Some(format!("m{}", b >> 3 & 7));
        d.mode = Some(["splice", "copy"][usize::from(b >> 6 & 1)].to_owned());
        d.resolve(&Defaults::default()).expect("a valid mapping")
    };
    let unique = |specs: Vec<Spec>| {
        let mut seen = std::collections::HashSet::new();
        specs
            .into_iter()
            .filter(|s| seen.insert(s.name.clone()))
            .collect::<Vec<_>>()
    };
    let n = usize::from(ops.byte() % 9);
    let current = unique((0..n).map(|_| spec(ops.byte())).collect());
    let degraded: Vec<bool> = current.iter().map(|_| ops.byte() & 1 == 1).collect();
    let m = usize::from(ops.byte() % 9);
    let wanted = unique((0..m).map(|_| spec(ops.byte())).collect());
    let p = plan::plan(
        current
            .iter()
            .zip(&degraded)
            .map(|(spec, &degraded)| plan::Current { spec, degraded }),
        &wanted,
    );
    for w in &wanted {
        let kept = p.keep.contains(&w.name);
        let started = p.start.iter().any(|s| s.name == w.name);
        let replaced = p.replace.iter().any(|s| s.name == w.name);
        assert_eq!(
            usize::from(kept) + usize::from(started) + usize::from(replaced),
            1,
            "{w:?} in {p:?}"
        );
        let running = current
            .iter()
            .zip(&degraded)
            .find(|(c, _)| c.name == w.name);
        assert_eq!(started, running.is_none());
        if kept {
            let (c, &d) = running.expect("kept: it runs");
            assert!(c == w && !d);
        }
    }
    for c in &current {
        assert_eq!(
            p.retire.contains(&c.name),
            !wanted.iter().any(|w| w.name == c.name)
        );
    }
}

/// The sockmap allowance over a stream of counters that only grow: the grant never falls
/// behind what was redirected, reports before its limit, and leaves the unacknowledged
/// bytes within the allowance.
pub fn allowance(data: &[u8]) {
    let mut ops = Ops(data);
    let sndbuf = usize::from(ops.byte()) << (ops.byte() % 16);
    let a = Allowance::of_send_buffer(sndbuf);
    let (mut forwarded, mut redirected, mut acked) = (0u64, 0u64, 0u64);
    while ops.more() {
        let step = |ops: &mut Ops<'_>| u64::from(ops.byte()) << (ops.byte() % 24);
        forwarded += step(&mut ops);
        redirected += step(&mut ops);
        acked = (acked + step(&mut ops)).min(forwarded + redirected);
        let g = a.grant(forwarded, redirected, acked);
        assert!(redirected <= g.report && g.report <= g.limit, "{g:?}");
        let unacked = forwarded + redirected - acked;
        assert!(
            unacked + (g.limit - redirected) <= a.bytes().max(unacked),
            "{g:?} with {unacked} unacknowledged"
        );
        if g.limit == redirected + a.bytes() {
            assert!(a.untouched(g.limit, redirected));
        }
        let _ = a.has_room(forwarded + redirected, acked);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replays the kept corpus (the test inputs it was seeded with and what the fuzzer
    /// found, crashes included) through each target.
    #[test]
    fn the_kept_corpus_passes_every_target() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        for (name, target) in TARGETS {
            let dir = root.join(name);
            let inputs: Vec<_> = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .map(|e| e.unwrap().path())
                .collect();
            assert!(!inputs.is_empty(), "no corpus for {name}");
            for input in inputs {
                let data = std::fs::read(&input).unwrap();
                if std::panic::catch_unwind(|| target(&data)).is_err() {
                    panic!("{name} fails on {}", input.display());
                }
            }
        }
    }

    #[test]
    fn arbitrary_bytes_do_not_panic_the_targets() {
        // A cheap stand-in for the fuzzer on the stable toolchain: fixed pseudo-random
        // inputs of every length up to 256.
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        for len in 0..256 {
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            for (_, target) in TARGETS {
                target(&data);
            }
        }
    }
}
