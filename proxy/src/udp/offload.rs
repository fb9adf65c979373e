//! UDP segmentation offload, the pure part: which datagrams of a batch leave together as one
//! `UDP_SEGMENT` send (a "train"), and which segment sizes a socket's paths have refused.
//!
//! A train is a run of datagrams of one size, the last maybe shorter, at most
//! [`MAX_SEGMENTS`] of them and [`MAX_BYTES`] in all: the kernel carries it through the stack
//! as one packet and cuts it into datagrams as late as it can (the receiving socket, or the
//! device), so the stack is walked once per train instead of once per datagram. A slot that
//! GRO filled with several datagrams is a train already; it goes out whole, or in pieces
//! when the path refuses its segment size.
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// Segments per send. Linux took 64 until 6.x raised `UDP_MAX_SEGMENTS` to 128; 64 works on
/// every kernel that has `UDP_SEGMENT` (4.18 on).
pub(super) const MAX_SEGMENTS: usize = 64;
/// Payload bytes per send: what one IPv4 datagram can carry (IPv6 takes 20 more).
pub(super) const MAX_BYTES: usize = 65_507;

/// A received slot as the sender sees it: `len` payload bytes, which GRO coalesced from
/// `segment`-byte datagrams (the last maybe shorter) when `segment` is set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Shape {
    pub(super) len: usize,
    pub(super) segment: Option<usize>,
}

impl Shape {
    /// How many datagrams the slot holds.
    pub(super) fn datagrams(self) -> usize {
        match self.segment {
            Some(s) if s > 0 && self.len > 0 => self.len.div_ceil(s),
            _ => 1,
        }
    }

    /// The size of the datagram that starts `offset` bytes into the slot.
    fn datagram_at(self, offset: usize) -> usize {
        let left = self.len - offset;
        match self.segment {
            Some(s) if s > 0 => s.min(left),
            _ => left,
        }
    }
}

/// Where a send resumes: a slot, and how many of its bytes already left (a coalesced slot
/// can go out in several sends).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Cursor {
    pub(super) slot: usize,
    pub(super) offset: usize,
}

impl Cursor {
    pub(super) fn at(slot: usize) -> Self {
        Self { slot, offset: 0 }
    }

    fn after(self, shapes: &[Shape], size: usize) -> Self {
        let offset = self.offset + size;
        if offset >= shapes[self.slot].len {
            Self::at(self.slot + 1)
        } else {
            Self {
                slot: self.slot,
                offset,
            }
        }
    }
}

/// One message of a `sendmmsg` call: the datagrams from `start` to `end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Train {
    pub(super) start: Cursor,
    pub(super) end: Cursor,
    pub(super) datagrams: usize,
    pub(super) bytes: usize,
    /// The size of every datagram but the last, when there are several: the `UDP_SEGMENT`
    /// value.
    pub(super) segment: Option<u16>,
}

/// The message that starts at `at` (a slot before `end`): as many datagrams as one segmented
/// send may carry, if their sizes allow it and the first is at most `limit` bytes (the largest
/// segment the socket's paths take, see [`Offload`]); otherwise the one datagram.
pub(super) fn next_train(shapes: &[Shape], at: Cursor, end: usize, limit: usize) -> Train {
    let first = shapes[at.slot].datagram_at(at.offset);
    let mut train = Train {
        start: at,
        end: at.after(shapes, first),
        datagrams: 1,
        bytes: first,
        segment: None,
    };
    // An empty datagram cannot be a segment, and UDP_SEGMENT is a u16.
    if first == 0 || first > limit || u16::try_from(first).is_err() {
        return train;
    }
    let mut last = first;
    while train.end.slot < end && last == first && train.datagrams < MAX_SEGMENTS {
        let size = shapes[train.end.slot].datagram_at(train.end.offset);
        if size == 0 || size > first || train.bytes + size > MAX_BYTES {
            break;
        }
        train.end = train.end.after(shapes, size);
        train.datagrams += 1;
        train.bytes += size;
        last = size;
    }
    if train.datagrams > 1 {
        train.segment = u16::try_from(first).ok();
    }
    train
}

/// The largest segment a sending socket may offload; 0 when offload is off. Lowered when a
/// path refuses a segmented send, so that later datagrams of that size go one by one at once.
#[derive(Debug)]
pub(super) struct Offload(AtomicUsize);

/// What a refused segmented send tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    /// The segment is larger than the path's MTU allows: smaller ones may still go.
    TooBig,
    /// The kernel or the route cannot segment at all (no `UDP_SEGMENT`, no checksum offload
    /// on the device, IPsec): offload is off for this socket from now on.
    Unsupported,
}

impl Offload {
    pub(super) fn new(on: bool) -> Self {
        Self(AtomicUsize::new(if on { usize::MAX } else { 0 }))
    }

    pub(super) fn limit(&self) -> usize {
        self.0.load(Relaxed)
    }

    /// A send of `segment`-byte segments failed with `errno`: what that means, if it is a
    /// refusal of the segmentation rather than of the datagrams (then the caller sends them
    /// again one by one, and nothing is lost).
    pub(super) fn refused(&self, segment: usize, errno: i32) -> Option<Refusal> {
        match errno {
            libc::EINVAL | libc::EMSGSIZE => {
                self.0.fetch_min(segment.saturating_sub(1), Relaxed);
                Some(Refusal::TooBig)
            }
            libc::EIO | libc::EOPNOTSUPP | libc::ENOPROTOOPT => {
                self.0.store(0, Relaxed);
                Some(Refusal::Unsupported)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(len: usize) -> Shape {
        Shape { len, segment: None }
    }

    fn gro(len: usize, segment: usize) -> Shape {
        Shape {
            len,
            segment: Some(segment),
        }
    }

    /// Every train from the first slot to `end`, as (datagrams, bytes, segment).
    fn trains(shapes: &[Shape], limit: usize) -> Vec<(usize, usize, Option<u16>)> {
        let mut at = Cursor::default();
        let mut out = Vec::new();
        while at.slot < shapes.len() {
            let t = next_train(shapes, at, shapes.len(), limit);
            assert_eq!(t.start, at);
            out.push((t.datagrams, t.bytes, t.segment));
            at = t.end;
        }
        out
    }

    #[test]
    fn equal_datagrams_ride_together_and_a_shorter_one_ends_the_train() {
        let s = [one(1400), one(1400), one(1400), one(100), one(1400)];
        assert_eq!(
            trains(&s, usize::MAX),
            [(4, 4300, Some(1400)), (1, 1400, None)]
        );
    }

    #[test]
    fn a_larger_datagram_or_an_empty_one_starts_a_new_message() {
        let s = [one(64), one(64), one(1400), one(0), one(0), one(64)];
        assert_eq!(
            trains(&s, usize::MAX),
            [
                (2, 128, Some(64)),
                (1, 1400, None),
                (1, 0, None),
                (1, 0, None),
                (1, 64, None)
            ]
        );
    }

    #[test]
    fn trains_stop_at_64_segments_and_65507_bytes() {
        let small = vec![one(10); 70];
        assert_eq!(
            trains(&small, usize::MAX),
            [(64, 640, Some(10)), (6, 60, Some(10))]
        );
        let large = vec![one(1400); 50];
        // 46 × 1,400 = 64,400; one more would pass 65,507.
        assert_eq!(
            trains(&large, usize::MAX),
            [(46, 64_400, Some(1400)), (4, 5600, Some(1400))]
        );
    }

    #[test]
    fn a_coalesced_slot_goes_whole_joins_its_equals_or_goes_in_pieces() {
        // 3 × 1,000 + 500, then a plain 1,000: the short tail ends the first train.
        let s = [gro(3500, 1000), one(1000)];
        assert_eq!(s[0].datagrams(), 4);
        assert_eq!(
            trains(&s, usize::MAX),
            [(4, 3500, Some(1000)), (1, 1000, None)]
        );
        // Full segments only: the next slot's equals join.
        let s = [gro(3000, 1000), one(1000), gro(2000, 1000)];
        assert_eq!(trains(&s, usize::MAX), [(6, 6000, Some(1000))]);
        // Refused (limit below the segment): one datagram per message, resuming mid-slot.
        let s = [gro(2500, 1000)];
        let t = next_train(&s, Cursor::default(), 1, 999);
        assert_eq!(
            (t.datagrams, t.bytes, t.end),
            (
                1,
                1000,
                Cursor {
                    slot: 0,
                    offset: 1000
                }
            )
        );
        assert_eq!(
            trains(&s, 999),
            [(1, 1000, None), (1, 1000, None), (1, 500, None)]
        );
    }

    #[test]
    fn a_train_never_passes_the_end_of_its_range() {
        let s = [one(100), one(100), one(100)];
        let t = next_train(&s, Cursor::at(0), 2, usize::MAX);
        assert_eq!((t.datagrams, t.end), (2, Cursor::at(2)));
    }

    #[test]
    fn refusals_lower_the_limit_or_turn_offload_off() {
        let o = Offload::new(true);
        assert_eq!(o.refused(8000, libc::EINVAL), Some(Refusal::TooBig));
        assert_eq!(o.limit(), 7999);
        assert_eq!(o.refused(9000, libc::EMSGSIZE), Some(Refusal::TooBig));
        assert_eq!(o.limit(), 7999, "a larger refusal does not raise it");
        assert_eq!(o.refused(1400, libc::ECONNREFUSED), None);
        assert_eq!(o.limit(), 7999, "not a refusal of the segmentation");
        assert_eq!(o.refused(1400, libc::EIO), Some(Refusal::Unsupported));
        assert_eq!(o.limit(), 0);
        assert_eq!(Offload::new(false).limit(), 0);
    }
}
