//! The redirect allowance's arithmetic, free of I/O: how far the program may redirect one
//! direction before berth looks again, and when a catch-up may hand the stream back.
//!
//! Bytes let through towards `dst` (forwarded by berth or redirected by the kernel) that
//! `dst`'s peer has not acknowledged sit in `dst`'s psock queue, its send queue or on the wire.
//! Keeping them under half of `dst`'s send buffer keeps the kernel's writer into `dst` from
//! ever waiting, so `dst`'s psock queue stays empty (see `conn.rs`, `Pump::allowance`).

/// The smallest allowance, whatever the send buffer (a freshly autotuned one can be a few
/// KiB).
pub(crate) const MIN_ALLOWANCE: u64 = 64 * 1024;

/// Bytes that may be on their way to `dst` unacknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Allowance(u64);

/// What the program is told: redirect up to `limit` (counted in bytes redirected so far), and
/// report when `report` is passed, so that berth refills before the allowance runs out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Grant {
    pub(crate) limit: u64,
    pub(crate) report: u64,
}

impl Allowance {
    /// Half of `dst`'s send buffer (`SO_SNDBUF`, as the kernel reports it), at least
    /// [`MIN_ALLOWANCE`].
    pub(crate) fn of_send_buffer(sndbuf: usize) -> Self {
        Self((sndbuf as u64 / 2).max(MIN_ALLOWANCE))
    }

    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn bytes(self) -> u64 {
        self.0
    }

    /// The grant after `forwarded` bytes berth moved and `redirected` bytes the kernel moved,
    /// of which `dst`'s peer acknowledged `acked_by_peer`: as far past `redirected` as the
    /// unacknowledged bytes leave room for, with the report at half that room.
    pub(crate) fn grant(self, forwarded: u64, redirected: u64, acked_by_peer: u64) -> Grant {
        let unacked = (forwarded + redirected).saturating_sub(acked_by_peer);
        let room = self.0.saturating_sub(unacked);
        Grant {
            limit: redirected + room,
            report: redirected + room / 2,
        }
    }

    /// Whether a grant at `redirected` with `limit` left the whole allowance free (nothing
    /// was redirected since: no need to grant again).
    pub(crate) fn untouched(self, limit: u64, redirected: u64) -> bool {
        limit == redirected + self.0
    }

    /// Whether a catch-up that put `queued` bytes towards `dst` may hand the stream back:
    /// at most half the allowance is unacknowledged. Handing it back sooner would let the
    /// program redirect a sliver and pass the rest, and berth would copy most of a stream
    /// whose receiver is slower than its sender.
    pub(crate) fn has_room(self, queued: u64, acked_by_peer: u64) -> bool {
        queued.saturating_sub(acked_by_peer) <= self.0 / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_the_send_buffer_with_a_floor() {
        assert_eq!(Allowance::of_send_buffer(64 << 20).bytes(), 32 << 20);
        assert_eq!(Allowance::of_send_buffer(4096).bytes(), MIN_ALLOWANCE);
        assert_eq!(Allowance::of_send_buffer(0).bytes(), MIN_ALLOWANCE);
    }

    #[test]
    fn a_grant_leaves_room_for_what_is_unacknowledged() {
        let a = Allowance(1000);
        // Nothing in flight: the whole allowance, the report halfway.
        assert_eq!(
            a.grant(0, 5000, 5000),
            Grant {
                limit: 6000,
                report: 5500
            }
        );
        // 400 bytes unacknowledged (100 forwarded by berth, 300 redirected).
        assert_eq!(
            a.grant(100, 5000, 4700),
            Grant {
                limit: 5600,
                report: 5300
            }
        );
        // More unacknowledged than the allowance: no room at all, and no underflow.
        assert_eq!(
            a.grant(0, 5000, 0),
            Grant {
                limit: 5000,
                report: 5000
            }
        );
        // The peer acknowledged more than was counted (a FIN's sequence number): full room.
        assert_eq!(
            a.grant(0, 10, 11),
            Grant {
                limit: 1010,
                report: 510
            }
        );
    }

    #[test]
    fn untouched_means_nothing_redirected_since_the_grant() {
        let a = Allowance(1000);
        let g = a.grant(0, 5000, 5000);
        assert!(a.untouched(g.limit, 5000));
        assert!(!a.untouched(g.limit, 5001));
    }

    #[test]
    fn a_catch_up_hands_back_at_half() {
        let a = Allowance(1000);
        assert!(a.has_room(10_000, 9_500));
        assert!(!a.has_room(10_000, 9_499));
        assert!(a.has_room(10, 20));
    }
}
