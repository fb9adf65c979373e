//! When a remote flow's conntrack entry may go. The TC program creates and refreshes entries;
//! user space sweeps them. The DNAT of client packets is stateless (a service lookup), so an
//! entry removed early is only missed by a backend's reply that comes before the client's
//! next packet: the timeouts are chosen for that.
use std::time::Duration;

use berth_common::dnat::{Flow, PROTO_TCP};

/// How long an entry may stay idle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// An open TCP connection. Long, as nf_conntrack's 5 days: a backend that pushes after a
    /// long silence needs its entry, and the LRU table bounds the memory anyway.
    pub tcp: Duration,
    /// A TCP connection after FIN from both sides or a RST: long enough for the last ACK and
    /// retransmitted FINs.
    pub closing: Duration,
    /// A UDP flow.
    pub udp: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tcp: Duration::from_secs(5 * 24 * 3600),
            closing: Duration::from_secs(10),
            udp: Duration::from_secs(120),
        }
    }
}

impl Timeouts {
    /// How often to sweep: half the shortest timeout, between 100 ms and 10 s.
    pub(crate) fn sweep_interval(&self) -> Duration {
        (self.closing.min(self.udp) / 2).clamp(Duration::from_millis(100), Duration::from_secs(10))
    }
}

/// True when TCP saw the flow end: FIN from both sides, or a RST from either.
pub(crate) fn ended(flow: &Flow) -> bool {
    flow.client_rst != 0 || flow.backend_rst != 0 || (flow.client_fin != 0 && flow.backend_fin != 0)
}

/// True when the entry of a flow of `proto`, last seen at `flow.last_seen`, may be deleted at
/// `now` (both CLOCK_MONOTONIC nanoseconds).
pub(crate) fn expired(flow: &Flow, proto: u8, now: u64, t: &Timeouts) -> bool {
    let limit = if proto != PROTO_TCP {
        t.udp
    } else if ended(flow) {
        t.closing
    } else {
        t.tcp
    };
    let idle = now.saturating_sub(flow.last_seen);
    u128::from(idle) >= limit.as_nanos()
}

/// CLOCK_MONOTONIC now, in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub(crate) fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .unwrap_or_else(|_| nix::sys::time::TimeSpec::new(0, 0));
    (ts.tv_sec() as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_common::dnat::PROTO_UDP;

    const S: u64 = 1_000_000_000;

    fn t() -> Timeouts {
        Timeouts {
            tcp: Duration::from_secs(100),
            closing: Duration::from_secs(10),
            udp: Duration::from_secs(30),
        }
    }

    #[test]
    fn open_tcp_lives_for_the_tcp_timeout() {
        let f = Flow {
            last_seen: 1_000 * S,
            ..Flow::default()
        };
        assert!(!expired(&f, PROTO_TCP, 1_099 * S, &t()));
        assert!(expired(&f, PROTO_TCP, 1_100 * S, &t()));
    }

    #[test]
    fn one_fin_keeps_the_flow_open_both_end_it() {
        let mut f = Flow {
            last_seen: 1_000 * S,
            client_fin: 1,
            ..Flow::default()
        };
        assert!(!ended(&f));
        assert!(!expired(&f, PROTO_TCP, 1_050 * S, &t()));
        f.backend_fin = 1;
        assert!(ended(&f));
        assert!(expired(&f, PROTO_TCP, 1_010 * S, &t()));
        assert!(!expired(&f, PROTO_TCP, 1_009 * S, &t()));
    }

    #[test]
    fn a_reset_from_either_side_ends_it() {
        for (c, b) in [(1, 0), (0, 1)] {
            let f = Flow {
                last_seen: 0,
                client_rst: c,
                backend_rst: b,
                ..Flow::default()
            };
            assert!(expired(&f, PROTO_TCP, 10 * S, &t()));
        }
    }

    #[test]
    fn udp_uses_its_own_timeout_and_ignores_tcp_flags() {
        let f = Flow {
            last_seen: 0,
            client_fin: 1,
            backend_fin: 1,
            ..Flow::default()
        };
        assert!(!expired(&f, PROTO_UDP, 29 * S, &t()));
        assert!(expired(&f, PROTO_UDP, 30 * S, &t()));
    }

    #[test]
    fn a_clock_behind_the_entry_never_expires_it() {
        let f = Flow {
            last_seen: 50 * S,
            ..Flow::default()
        };
        assert!(!expired(&f, PROTO_UDP, 10 * S, &t()));
    }

    #[test]
    fn sweep_interval_follows_the_shortest_timeout() {
        assert_eq!(t().sweep_interval(), Duration::from_secs(5));
        let fast = Timeouts {
            closing: Duration::ZERO,
            ..t()
        };
        assert_eq!(fast.sweep_interval(), Duration::from_millis(100));
        assert_eq!(Timeouts::default().sweep_interval(), Duration::from_secs(5));
    }
}
