//! Reads the effective capability set, to turn a later EPERM into an error that says what to do.

/// Capabilities berth checks for (numbers from linux/capability.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cap {
    NetAdmin = 12,
    SysAdmin = 21,
    Bpf = 39,
}

/// True if the calling thread's effective set holds `cap`. Unknown (no /proc) counts as held,
/// so that the kernel's own answer decides.
pub fn has(cap: Cap) -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/thread-self/status") else {
        return true;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_none_or(|eff| eff & (1 << cap as u32) != 0)
}
