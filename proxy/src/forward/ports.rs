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
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::RangeInclusive,
    sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering},
};

/// How long connects go straight to an explicit port once the kernel's pick failed or was
/// slow: it is asked again after this.
pub const PAUSE_MS: u64 = 1_000;

/// A connect() call slower than this had the kernel search a crowded range (a plain one
/// takes a few microseconds, tens with the SYN's delivery on a veth).
pub const SLOW_CONNECT_US: u64 = 500;

/// Slow picks in a row that start choosing. One slow call is as often a thread preempted
/// inside connect() on a busy machine (seen at 10,000 conn/s on 2 cores, several times a
/// second) as a crowded range; in a crowded range every search is slow.
pub const SLOW_STREAK: i32 = 4;

/// Quick picks in a row that end an episode of choosing: one quick search in a crowded
/// range (a lucky start) does not.
pub const QUICK_STREAK: i32 = 16;

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

/// Where the next explicit port comes from; shared by every connect of the process.
#[derive(Debug, Default)]
pub struct Cursor {
    next: AtomicU32,
}

impl Cursor {
    /// A cursor at the range's first port.
    pub const fn new() -> Self {
        Self::starting_at(0)
    }

    /// A cursor at the range's `offset`th port (wrapping): processes that start at different
    /// offsets do not walk over each other's ports.
    pub const fn starting_at(offset: u32) -> Self {
        Self {
            next: AtomicU32::new(offset),
        }
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

/// How a connect() that let the kernel pick its port went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick {
    /// Within [`SLOW_CONNECT_US`].
    Quick,
    /// Slower: the kernel may have searched a crowded range.
    Slow,
    /// No port left (EADDRNOTAVAIL).
    Failed,
}

/// An episode of choosing ports began or ended (each is logged once).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Started,
    Ended,
}

/// Whether connects let the kernel pick their port or choose one, from how the kernel's
/// picks went: a failed pick, or [`SLOW_STREAK`] slow ones in a row, start an episode of
/// choosing. During one the kernel is asked again every [`PAUSE_MS`]; a slow answer resumes
/// choosing at once, and [`QUICK_STREAK`] quick ones in a row end the episode. Shared by
/// every connect of the process; concurrent updates may blur a streak by a pick or two,
/// which only moves a switch by as much.
#[derive(Debug, Default)]
pub struct Crowding {
    /// Milliseconds before which connects skip the kernel's pick; 0 before any episode.
    skip_until: AtomicU64,
    /// Slow picks in a row (positive) or, during an episode, quick ones (negative).
    streak: AtomicI32,
    choosing: AtomicBool,
}

impl Crowding {
    pub const fn new() -> Self {
        Self {
            skip_until: AtomicU64::new(0),
            streak: AtomicI32::new(0),
            choosing: AtomicBool::new(false),
        }
    }

    /// Whether a connect at `now_ms` should let the kernel pick its port.
    pub fn autobind(&self, now_ms: u64) -> bool {
        now_ms >= self.skip_until.load(Ordering::Relaxed)
    }

    /// Whether ports of connections ending at `now_ms` are worth keeping in [`Recent`]: an
    /// episode is on, or was within [`RECENT_MS`] (the range may crowd again). Otherwise a
    /// connection's end costs nothing here.
    pub fn remember(&self, now_ms: u64) -> bool {
        let until = self.skip_until.load(Ordering::Relaxed);
        until > 0 && now_ms < until.saturating_add(RECENT_MS)
    }

    /// Records a pick by the kernel at `now_ms`; says when an episode began or ended.
    pub fn record(&self, pick: Pick, now_ms: u64) -> Option<Change> {
        let choosing = self.choosing.load(Ordering::Relaxed);
        let start = match pick {
            Pick::Failed => true,
            Pick::Slow if choosing => true,
            Pick::Slow => self.bump(1) >= SLOW_STREAK,
            Pick::Quick if choosing => {
                if -self.bump(-1) < QUICK_STREAK {
                    return None;
                }
                self.streak.store(0, Ordering::Relaxed);
                let ended = self.choosing.swap(false, Ordering::Relaxed);
                return ended.then_some(Change::Ended);
            }
            Pick::Quick => {
                // Read first: every connect comes here, and a store on each would bounce
                // this line between the workers' caches for nothing.
                if self.streak.load(Ordering::Relaxed) != 0 {
                    self.streak.store(0, Ordering::Relaxed);
                }
                return None;
            }
        };
        if !start {
            return None;
        }
        self.streak.store(0, Ordering::Relaxed);
        self.skip_until
            .store(now_ms.saturating_add(PAUSE_MS).max(1), Ordering::Relaxed);
        let began = !self.choosing.swap(true, Ordering::Relaxed);
        began.then_some(Change::Started)
    }

    /// Extends the streak by `step` (its sign the kind of pick; a pick of the other kind
    /// starts a new one); returns its new value.
    fn bump(&self, step: i32) -> i32 {
        let extend = |s: i32| {
            if s.signum() == step.signum() {
                s + step
            } else {
                step
            }
        };
        let old = self
            .streak
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| Some(extend(s)))
            .unwrap_or_else(|s| s);
        extend(old)
    }
}

/// Local ports of berth's connections to targets that ended lately, oldest first.
#[derive(Debug, Default)]
pub struct Recent {
    /// (port, end) with the end in milliseconds, wrapping (8 B a port: up to 512 KiB).
    ports: VecDeque<(u16, u32)>,
}

impl Recent {
    pub const fn new() -> Self {
        Self {
            ports: VecDeque::new(),
        }
    }

    /// A connection from `port` ended at `now_ms`. Ports older than [`RECENT_MS`] go first.
    pub fn push(&mut self, port: u16, now_ms: u64) {
        let now = clock(now_ms);
        while let Some(&(_, at)) = self.ports.front() {
            if now.wrapping_sub(at) < RECENT_MS as u32 && self.ports.len() < RECENT_CAP {
                break;
            }
            self.ports.pop_front();
        }
        self.ports.push_back((port, now));
    }

    /// The oldest port that ended within [`RECENT_MS`] of `now_ms` (older ones are dropped:
    /// their TIME_WAIT may be over, the port wholly free).
    pub fn pop(&mut self, now_ms: u64) -> Option<u16> {
        let now = clock(now_ms);
        while let Some((port, at)) = self.ports.pop_front() {
            if now.wrapping_sub(at) < RECENT_MS as u32 {
                return Some(port);
            }
        }
        None
    }
}

/// The low 32 bits of a millisecond clock: ages up to 49 days compare right, and every
/// entry older than [`RECENT_MS`] is dropped long before.
fn clock(ms: u64) -> u32 {
    ms as u32
}

/// The unspecified address of `peer`'s family, at `port`: where a connect to `peer` binds
/// to take that local port on whichever address the route gives.
pub fn unspecified(peer: &SocketAddr, port: u16) -> SocketAddr {
    let any = match peer {
        SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    SocketAddr::new(any, port)
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
    fn recent_ports_forget_what_ended_long_ago_when_more_end() {
        let mut recent = Recent::new();
        recent.push(40_000, 0);
        recent.push(40_001, RECENT_MS);
        assert_eq!(recent.ports.len(), 1, "the first one aged out at the push");
        // Across the 32-bit wrap of the clock.
        let wrap = u64::from(u32::MAX);
        let mut recent = Recent::new();
        recent.push(40_002, wrap - 10);
        assert_eq!(recent.pop(wrap + 10), Some(40_002));
    }

    #[test]
    fn one_slow_pick_is_not_a_crowded_range_but_a_streak_is() {
        let c = Crowding::new();
        assert!(c.autobind(0));
        assert!(!c.remember(0), "nothing kept before any episode");
        // Slow picks broken by a quick one never start an episode.
        for t in 0..10 {
            for _ in 1..SLOW_STREAK {
                assert_eq!(c.record(Pick::Slow, t), None);
            }
            assert_eq!(c.record(Pick::Quick, t), None);
        }
        assert!(c.autobind(10));
        for _ in 1..SLOW_STREAK {
            assert_eq!(c.record(Pick::Slow, 5_000), None);
        }
        assert_eq!(c.record(Pick::Slow, 5_000), Some(Change::Started));
        assert!(!c.autobind(5_000));
        assert!(!c.autobind(5_000 + PAUSE_MS - 1));
        assert!(c.autobind(5_000 + PAUSE_MS), "the kernel is asked again");
        assert!(c.remember(5_000 + PAUSE_MS + RECENT_MS - 1));
        assert!(!c.remember(5_000 + PAUSE_MS + RECENT_MS));
    }

    #[test]
    fn during_an_episode_one_slow_pick_resumes_choosing_and_a_quick_streak_ends_it() {
        let c = Crowding::new();
        assert_eq!(c.record(Pick::Failed, 1_000), Some(Change::Started));
        assert!(!c.autobind(1_000));
        let t = 1_000 + PAUSE_MS;
        assert!(c.autobind(t));
        assert_eq!(
            c.record(Pick::Slow, t),
            None,
            "already choosing: not logged again"
        );
        assert!(!c.autobind(t), "one slow answer is enough now");
        let t = t + PAUSE_MS;
        for _ in 1..QUICK_STREAK {
            assert_eq!(c.record(Pick::Quick, t), None);
        }
        // A slow one in between starts the count again.
        assert_eq!(c.record(Pick::Slow, t), None);
        let t = t + PAUSE_MS;
        for _ in 1..QUICK_STREAK {
            assert_eq!(c.record(Pick::Quick, t), None);
        }
        assert_eq!(c.record(Pick::Quick, t), Some(Change::Ended));
        assert_eq!(c.record(Pick::Quick, t), None, "ended once");
        // Now a single slow pick is back to being noise.
        assert_eq!(c.record(Pick::Slow, t), None);
        assert!(c.autobind(t));
    }

    #[test]
    fn the_unspecified_address_has_the_peers_family() {
        let v4: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let v6: SocketAddr = "[fd00::1]:80".parse().unwrap();
        assert_eq!(unspecified(&v4, 40_000), "0.0.0.0:40000".parse().unwrap());
        assert_eq!(unspecified(&v6, 40_000), "[::]:40000".parse().unwrap());
    }
}
