//! berth's kernel programs: for now the sockmap stream verdict that relays bytes between a
//! client socket and its container socket without leaving the kernel.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::sk_action,
    helpers::bpf_get_socket_cookie,
    macros::{map, stream_verdict},
    maps::{HashMap, RingBuf, SockHash},
    programs::SkBuffContext,
};
use berth_common::sockmap::{
    CREDITS_BYTES, Counters, DEFAULT_MAX_ENTRIES, MAX_TRIM, Peer, SEQ_BROKEN, SEQ_KNOWN,
    SEQ_UNCHECKED, TRIM_STEP,
};

#[map(name = "BERTH_SOCKS")]
static BERTH_SOCKS: SockHash<u64> = SockHash::with_max_entries(DEFAULT_MAX_ENTRIES, 0);

#[map(name = "BERTH_PEERS")]
static BERTH_PEERS: HashMap<u64, Peer> = HashMap::with_max_entries(DEFAULT_MAX_ENTRIES, 0);

#[map(name = "BERTH_COUNTERS")]
static BERTH_COUNTERS: HashMap<u64, Counters> = HashMap::with_max_entries(DEFAULT_MAX_ENTRIES, 0);

#[map(name = "BERTH_CREDITS")]
static BERTH_CREDITS: RingBuf = RingBuf::with_byte_size(CREDITS_BYTES, 0);

/// Redirects each received segment to the peer socket's send path, once user space has
/// forwarded everything it was passed, and within the allowance user space gave (see
/// `berth_common::sockmap`).
///
/// A socket without entries keeps its data (SK_PASS): user space reads it normally.
#[stream_verdict]
fn berth_sk_verdict(ctx: SkBuffContext) -> u32 {
    // SAFETY: the helper only reads the socket behind this program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    // SAFETY: a plain `repr(C)` value that the map keeps alive while the program runs.
    let Some(peer) = (unsafe { BERTH_PEERS.get(cookie) }) else {
        return sk_action::SK_PASS;
    };
    let Some(counters) = BERTH_COUNTERS.get_ptr_mut(cookie) else {
        return sk_action::SK_PASS;
    };
    let len = u64::from(ctx.len());
    if len == 0 {
        // A bare FIN. TCP has already applied it (RCV_SHUTDOWN, which user space sees as
        // EPOLLRDHUP and as read() returning 0); the empty segment only marks the spot.
        // Redirected, the peer's backlog would send 0 bytes and report EPIPE on the peer;
        // passed while this socket's backlog is busy, its own backlog would do the same to
        // it. Dropped, it is simply consumed.
        return sk_action::SK_DROP;
    }
    // SAFETY: the pointer is to this socket's entry; its segments are processed one at a time,
    // so no other program instance writes it concurrently.
    let counters = unsafe { &mut *counters };
    if counters.flags & SEQ_BROKEN != 0 {
        return sk_action::SK_DROP;
    }
    if !trim_overlap(&ctx, counters) {
        if counters.flags & SEQ_BROKEN != 0 {
            // User space resets the connection; tell it now rather than at its next look.
            report(cookie);
        }
        return sk_action::SK_DROP;
    }
    let len = u64::from(ctx.len());
    if peer.ready == 0 || counters.passed != peer.acked {
        counters.passed += len;
        return sk_action::SK_PASS;
    }
    let before = counters.redirected;
    if before.saturating_add(len) > peer.limit {
        // Out of allowance: this and every later segment stay queued for user space (and
        // charged to this socket) until it has caught up.
        counters.passed += len;
        report(cookie);
        return sk_action::SK_PASS;
    }
    let mut key = peer.cookie;
    // The helper returns SK_PASS when it queued the redirect and SK_DROP otherwise.
    let verdict = BERTH_SOCKS.redirect_skb(&ctx, &mut key, 0) as u32;
    if verdict == sk_action::SK_PASS {
        counters.redirected = before + len;
        if before < peer.notify_at && before + len >= peer.notify_at {
            report(cookie);
        }
    }
    verdict
}

/// Cuts off the front of the segment what an earlier segment already brought (a
/// retransmission that overlaps, see `berth_common::sockmap`). False when the segment must be
/// dropped: it was all old (TCP itself drops those, so this is only a guard), or the overlap
/// could not be cut off, which marks the socket [`SEQ_BROKEN`].
#[inline(always)]
fn trim_overlap(ctx: &SkBuffContext, counters: &mut Counters) -> bool {
    // TCP's control block (`struct tcp_skb_cb`) starts with the segment's first and end
    // sequence numbers, and an sk_skb program's `cb[]` is the start of that same area. The
    // end counts a FIN, so a segment whose numbers do not span its length (or one more) is
    // not laid out that way: leave it alone, and say so.
    let (seq, end, len) = (ctx.cb()[0], ctx.cb()[1], ctx.len());
    let span = end.wrapping_sub(seq);
    if span != len && span != len.wrapping_add(1) {
        counters.flags |= SEQ_UNCHECKED;
        return true;
    }
    if counters.flags & SEQ_KNOWN == 0 {
        // The first segment through the program: nothing before it was handled.
        counters.next_seq = seq;
        counters.flags |= SEQ_KNOWN;
    }
    let data_end = seq.wrapping_add(len);
    // Serial-number arithmetic: positive when `seq` is before `next_seq`.
    let overlap = counters.next_seq.wrapping_sub(seq).cast_signed();
    if overlap > 0 {
        let overlap = overlap.cast_unsigned();
        if overlap >= len {
            counters.trimmed += u64::from(len);
            return false;
        }
        if overlap > MAX_TRIM {
            counters.flags |= SEQ_BROKEN;
            return false;
        }
        let mut left = overlap;
        for _ in 0..MAX_TRIM / TRIM_STEP {
            if left == 0 {
                break;
            }
            let step = if left < TRIM_STEP { left } else { TRIM_STEP };
            // A negative difference removes bytes from the front of an sk_skb.
            if ctx.adjust_room(-step.cast_signed(), 0, 0).is_err() {
                counters.flags |= SEQ_BROKEN;
                return false;
            }
            left -= step;
        }
        counters.trimmed += u64::from(overlap);
    }
    if data_end.wrapping_sub(counters.next_seq).cast_signed() > 0 {
        counters.next_seq = data_end;
    }
    true
}

/// Tells user space that `cookie`'s allowance is running low. A full ring loses the report;
/// user space also looks every second.
#[inline(always)]
fn report(cookie: u64) {
    let _ = BERTH_CREDITS.output::<u64>(cookie, 0);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
