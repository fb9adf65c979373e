//! berth's kernel programs: for now the sockmap stream verdict that relays bytes between a client
//! socket and its container socket without leaving the kernel.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::sk_action,
    helpers::bpf_get_socket_cookie,
    macros::{map, stream_verdict},
    maps::{HashMap, SockHash},
    programs::SkBuffContext,
};
use berth_common::sockmap::{DEFAULT_MAX_ENTRIES, Peer};

#[map(name = "BERTH_SOCKS")]
static BERTH_SOCKS: SockHash<u64> = SockHash::with_max_entries(DEFAULT_MAX_ENTRIES, 0);

#[map(name = "BERTH_PEERS")]
static BERTH_PEERS: HashMap<u64, Peer> = HashMap::with_max_entries(DEFAULT_MAX_ENTRIES, 0);

/// Redirects each received segment to the peer socket's send path.
///
/// A socket without a peer entry keeps its data (SK_PASS): user space then reads it normally,
/// which is also how bytes that raced the map insertion are recovered.
#[stream_verdict]
fn berth_sk_verdict(ctx: SkBuffContext) -> u32 {
    // SAFETY: the helper only reads the socket behind this program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    // SAFETY: the value is a plain `repr(C)` u64 that the map keeps alive during the program.
    let Some(peer) = (unsafe { BERTH_PEERS.get(cookie) }) else {
        return sk_action::SK_PASS;
    };
    let mut key = peer.cookie;
    // The helper returns SK_PASS when it queued the redirect and SK_DROP otherwise.
    BERTH_SOCKS.redirect_skb(&ctx, &mut key, 0) as u32
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
