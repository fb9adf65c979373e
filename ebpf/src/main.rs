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
use berth_common::sockmap::{CREDITS_BYTES, Counters, DEFAULT_MAX_ENTRIES, Peer};

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
