//! Local ports for connects to the target once the kernel's own pick is crowded out: ports of
//! berth's own recent connections first, then the ephemeral range minus the reserved ports,
//! walked from a shared cursor.
//!
//! Why: `connect()` on an unbound socket (the kernel picks the port) never takes a port whose
//! connection to the same peer sits in TIME_WAIT unless `net.ipv4.tcp_tw_reuse` allows it
//! (by default only on loopback), and it searches the range port by port for one it may
//! take: with thousands in TIME_WAIT that search costs milliseconds per connect, and then
//! fails. A socket bound to such a port first (with SO_REUSEADDR, as the TIME_WAIT one was)
//! may take it when that connection carried TCP timestamps: PAWS tells old segments from
//! new, as for `tcp_tw_reuse=1`. Clients that close first leave berth's leg to the target in
//! TIME_WAIT, 60 s each; this is what keeps a high rate of them served, at full speed.
//!
//! Ports of berth's own recent connections come first because their TIME_WAIT still holds
//! them: binding one joins what the kernel already has. A port bound while wholly free is
//! kept out of every other program's `connect()` search for as long as berth holds it.
use std::{
    collections::VecDeque,
    ops::RangeInclusive,
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
};

/// How long connects go straight to an explicit port after the kernel's pick failed or was
/// slow: it is asked again after this.
pub const PAUSE_MS: u64 = 1_000;

/// A connect() call slower than this had the kernel search a crowded range (a plain one
/// takes a few microseconds, tens with the SYN's delivery on a veth).
pub const SLOW_CONNECT_US: u64 = 500;

/// How long a recent port is worth binding: its TIME_WAIT (60 s) most likely still holds
/// it.
pub const RECENT_MS: u64 = 55_000;

/// Recent ports kept at most (one per connection that ended within [`RECENT_MS`]).
pub const RECENT_CAP: usize = 65_536;

/// Ports tried per connect before giving up (each attempt costs a socket, a bind and a connect
/// that fail at once: a port held by a listener, or by a live connection to the same peer).
pub const ATTEMPTS: usize = 32;

/// The ports the kernel gives connects, as `net.ipv4.ip_local_port_range` and
/// `net.ipv4.ip_local_reserved_ports` say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Range {
    ports: RangeInclusive<u16>,
    reserved: Vec<RangeInclusive<u16>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unreadable port list {0:?}")]
pub struct ParseError(String);

impl Range {
    /// From the two sysctls' texts: `"32768\t60999"` and `"8080,9000-9010"` (maybe empty).
    pub fn parse(range: &str, reserved: &str) -> Result<Self, ParseError> {
        let bad = || ParseError(range.trim().to_owned());
        let mut it = range.split_whitespace().map(str::parse::<u16>);
        let (Some(Ok(lo)), Some(Ok(hi)), None) = (it.next(), it.next(), it.next()) else {
            return Err(bad());
        };
        if lo == 0 || lo > hi {
            return Err(bad());
        }
        let reserved = reserved
            .trim()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|item| {
                let bad = || ParseError(item.to_owned());
                let (a, b) = item.split_once('-').unwrap_or((item, item));
                let (a, b) = (
                    a.parse::<u16>().map_err(|_| bad())?,
                    b.parse::<u16>().map_err(|_| bad())?,
                );
                if a > b {
                    return Err(bad());
                }
                Ok(a..=b)
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            ports: lo..=hi,
            reserved,
        })
    }

    /// The range of the network namespace berth runs in.
    pub fn read() -> std::io::Result<Self> {
        let sys = |name: &str| std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"));
        // Older kernels may lack the reserved list: nothing is reserved then.
        let reserved = sys("ip_local_reserved_ports").unwrap_or_default();
        Self::parse(&sys("ip_local_port_range")?, &reserved)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    fn len(&self) -> u32 {
        u32::from(*self.ports.end()) - u32::from(*self.ports.start()) + 1
    }

    fn is_reserved(&self, port: u16) -> bool {
        self.reserved.iter().any(|r| r.contains(&port))
    }

    /// The `index`th port of the range (wrapping), or `None` if that one is reserved.
    pub fn nth(&self, index: u32) -> Option<u16> {
        let offset = index % self.len();
        let port = u16::try_from(u32::from(*self.ports.start()) + offset).ok()?;
        (!self.is_reserved(port)).then_some(port)
    }
}

/// Where the next explicit port comes from, and until when the kernel's pick is skipped;
/// shared by every connect of the process.
#[derive(Debug, Default)]
pub struct Cursor {
    next: AtomicU32,
    /// Milliseconds (see [`Cursor::autobind`]) before which connects skip the kernel's pick.
    skip_until: AtomicU64,
}

impl Cursor {
    pub const fn new() -> Self {
        Self {
            next: AtomicU32::new(0),
            skip_until: AtomicU64::new(0),
        }
    }

    /// Whether a connect at `now_ms` should let the kernel pick its port.
    pub fn autobind(&self, now_ms: u64) -> bool {
        now_ms >= self.skip_until.load(Ordering::Relaxed)
    }

    /// The kernel's pick failed at `now_ms`: explicit ports for the next [`PAUSE_MS`].
    pub fn autobind_failed(&self, now_ms: u64) {
        self.skip_until
            .store(now_ms.saturating_add(PAUSE_MS), Ordering::Relaxed);
    }

    /// Up to [`ATTEMPTS`] ports of `range` to try, continuing where the last connect stopped
    /// (reserved ports skipped; concurrent connects get different ones).
    pub fn candidates<'a>(&'a self, range: &'a Range) -> impl Iterator<Item = u16> + 'a {
        let budget = range.len().min(ATTEMPTS as u32 * 2);
        (0..budget)
            .filter_map(|_| range.nth(self.next.fetch_add(1, Ordering::Relaxed)))
            .take(ATTEMPTS)
    }
}

/// Local ports of berth's connections to targets that ended lately, oldest first.
#[derive(Debug, Default)]
pub struct Recent {
    ports: VecDeque<(u16, u64)>,
}

impl Recent {
    pub const fn new() -> Self {
        Self {
            ports: VecDeque::new(),
        }
    }

    /// A connection from `port` ended at `now_ms`.
    pub fn push(&mut self, port: u16, now_ms: u64) {
        if self.ports.len() == RECENT_CAP {
            self.ports.pop_front();
        }
        self.ports.push_back((port, now_ms));
    }

    /// The oldest port that ended within [`RECENT_MS`] of `now_ms` (older ones are dropped:
    /// their TIME_WAIT may be over, the port wholly free).
    pub fn pop(&mut self, now_ms: u64) -> Option<u16> {
        while let Some((port, at)) = self.ports.pop_front() {
            if now_ms.saturating_sub(at) < RECENT_MS {
                return Some(port);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_sysctls() {
        let r = Range::parse("32768\t60999\n", "8080,9000-9002\n").unwrap();
        assert_eq!(r.len(), 28_232);
        assert_eq!(r.nth(0), Some(32_768));
        assert_eq!(r.nth(28_232), Some(32_768), "wraps");
        let r = Range::parse("9000 9003", "9001-9002").unwrap();
        let got: Vec<_> = (0..4).map(|i| r.nth(i)).collect();
        assert_eq!(got, [Some(9000), None, None, Some(9003)]);
        assert_eq!(Range::parse("1 1", "").unwrap().len(), 1);
    }

    #[test]
    fn refuses_what_is_not_a_range() {
        for (range, reserved) in [
            ("", ""),
            ("40000", ""),
            ("5 4", ""),
            ("0 10", ""),
            ("1 2 3", ""),
            ("1 70000", ""),
            ("1 9", "x"),
            ("1 9", "5-3"),
        ] {
            assert!(
                Range::parse(range, reserved).is_err(),
                "{range:?} {reserved:?}"
            );
        }
    }

    #[test]
    fn candidates_continue_across_connects_skip_reserved_and_are_bounded() {
        let cursor = Cursor::new();
        let r = Range::parse("40000 40005", "40001").unwrap();
        let first: Vec<_> = cursor.candidates(&r).take(2).collect();
        assert_eq!(first, [40000, 40002]);
        let next: Vec<_> = cursor.candidates(&r).take(2).collect();
        assert_eq!(
            next,
            [40003, 40004],
            "the next connect starts after the last"
        );
        // A small range is walked once per connect, not ATTEMPTS times.
        assert_eq!(cursor.candidates(&r).count(), 5);
        let wide = Range::parse("1024 65535", "").unwrap();
        assert_eq!(cursor.candidates(&wide).count(), ATTEMPTS);
        // Everything reserved: nothing to try, and no endless loop.
        let none = Range::parse("40000 40001", "40000-40001").unwrap();
        assert_eq!(cursor.candidates(&none).count(), 0);
    }

    #[test]
    fn recent_ports_come_oldest_first_while_their_time_wait_lasts() {
        let mut recent = Recent::new();
        recent.push(40_000, 1_000);
        recent.push(40_001, 2_000);
        recent.push(40_002, 30_000);
        // At 56 s the first ended RECENT_MS ago: dropped, not given.
        assert_eq!(recent.pop(56_000), Some(40_001));
        assert_eq!(recent.pop(56_000), Some(40_002));
        assert_eq!(recent.pop(56_000), None);
        for i in 0..=RECENT_CAP {
            recent.push(u16::try_from(i % 60_000).unwrap(), 0);
        }
        assert_eq!(recent.ports.len(), RECENT_CAP, "bounded");
        assert_eq!(recent.pop(0), Some(1), "the oldest went to make room");
    }

    #[test]
    fn the_kernels_pick_is_skipped_for_a_while_after_it_failed() {
        let cursor = Cursor::new();
        assert!(cursor.autobind(0));
        cursor.autobind_failed(5_000);
        assert!(!cursor.autobind(5_000));
        assert!(!cursor.autobind(5_000 + PAUSE_MS - 1));
        assert!(cursor.autobind(5_000 + PAUSE_MS));
    }
}
