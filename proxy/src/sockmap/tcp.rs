//! What TCP_INFO and SIOCOUTQ tell about a socket's stream: the ground truth that the
//! hand-over compares the program's counters with.
use std::{io, net::TcpStream as StdStream, os::fd::AsFd};

use crate::sys::tcp_info;

/// Payload bytes `s` has received: TCP_INFO's count, less the one the FIN adds once it came.
pub(super) fn received_payload(s: &StdStream) -> io::Result<u64> {
    let info = tcp_info(s)?;
    // Established, or we alone have closed: no FIN from the peer yet.
    let fin = !matches!(
        info.tcpi_state,
        TCP_ESTABLISHED | TCP_FIN_WAIT1 | TCP_FIN_WAIT2
    );
    Ok(info.tcpi_bytes_received.saturating_sub(u64::from(fin)))
}

/// Bytes written into `s` that its peer has acknowledged.
pub(super) fn acked_by_peer(s: &StdStream) -> io::Result<u64> {
    Ok(tcp_info(s)?.tcpi_bytes_acked)
}

/// Bytes ever written into `s`: acknowledged by its peer, plus still in its send queue.
/// TCP_INFO is read before SIOCOUTQ, so an ACK in between can only make this an undercount.
pub(super) fn written(s: &StdStream) -> io::Result<u64> {
    use std::os::fd::AsRawFd as _;
    let acked = acked_by_peer(s)?;
    let mut outq: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int.
    let rc = unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &raw mut outq) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(acked + u64::try_from(outq).unwrap_or(0))
}

/// Linux's TCP state numbers (`tcpi_state`).
const TCP_ESTABLISHED: u8 = 1;
const TCP_FIN_WAIT1: u8 = 4;
const TCP_FIN_WAIT2: u8 = 5;

pub(super) fn established(s: &impl AsFd) -> bool {
    tcp_info(s).is_ok_and(|i| i.tcpi_state == TCP_ESTABLISHED)
}
