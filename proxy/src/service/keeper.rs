//! The unit's main process after `berth upgrade` under systemd: the old daemon, once drained,
//! becomes `berth-keeper` (an exec of its own binary) and stays until the last successor ends.
//!
//! systemd (252 at least) does not wait for a main process it did not start, so naming the
//! successor with `MAINPID=` made the next `systemctl stop` kill it without its drain. The
//! keeper keeps the main pid systemd started: it is a child subreaper (a second upgrade's
//! successor comes to it when the first successor exits), forwards SIGTERM, SIGINT, SIGHUP
//! and SIGQUIT to its children, and exits with the status of the last one, so that a crash
//! of the successor still fails the unit (and `Restart=on-failure` applies). The successor
//! notifies systemd itself, which needs `NotifyAccess=all` in the unit.
//!
//! Everything here is synchronous: the keeper has one thread and no runtime.
use std::{ffi::CString, io, process::ExitCode};

/// The name the keeper runs under (`argv[0]`, and what `ps` shows).
pub const NAME: &str = "berth-keeper";

/// Signals passed on to the successor(s).
const FORWARDED: [libc::c_int; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT];

/// Whether this daemon should keep the main process after handing over: it was started by
/// systemd (`$NOTIFY_SOCKET`), not as a successor.
pub fn wanted(take_over: bool) -> bool {
    !take_over && std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// Makes orphans of this process's subtree (a successor whose parent successor exited) its
/// children, so that the keeper can wait for them.
pub(crate) fn become_subreaper() -> io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(io::Error::from)
}

/// Replaces this process with the keeper. Returns only on failure.
pub fn exec() -> io::Error {
    let (Ok(path), Ok(argv0)) = (CString::new("/proc/self/exe"), CString::new(NAME)) else {
        return io::Error::other("unreachable: no NUL in constant strings");
    };
    let argv = [argv0.as_ptr(), std::ptr::null()];
    // Blocked before the exec (the mask survives it): a SIGTERM arriving while the keeper
    // starts must wait for it, not kill it with the default action.
    if let Err(e) = blocked(&FORWARDED) {
        return e;
    }
    // SAFETY: both arrays are NUL-terminated and outlive the call; on success nothing of this
    // process remains to observe.
    unsafe { libc::execv(path.as_ptr(), argv.as_ptr()) };
    io::Error::last_os_error()
}

/// The keeper's `main`.
pub fn main() -> ExitCode {
    // First, so that no signal to pass on is lost (exec blocked them already).
    let set = match blocked(&FORWARDED) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{NAME}: cannot block signals: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Descriptors a successor may still share (systemd's listening sockets are not
    // close-on-exec) stay open in it, not here.
    // SAFETY: close_range only closes descriptors; none is used by this process afterwards.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    // Named from argv[0] or from "/proc/self/exe" depending on the kernel; ps and tests look
    // for the keeper's own name.
    if let Err(e) = nix::sys::prctl::set_name(c"berth-keeper") {
        eprintln!("{NAME}: cannot set its name: {e}");
    }
    if let Err(e) = become_subreaper() {
        eprintln!("{NAME}: cannot become a child subreaper: {e}");
    }
    eprintln!("{NAME}: keeping the unit's main process until the serving berth exits");
    let mut last = None;
    loop {
        match reap(&mut last) {
            Ok(true) => {}
            Ok(false) => {
                let code = exit_code(last);
                eprintln!("{NAME}: no berth left; exiting with {code}");
                return ExitCode::from(code);
            }
            Err(e) => {
                eprintln!("{NAME}: waitpid: {e}");
                return ExitCode::FAILURE;
            }
        }
        // SAFETY: `set` is initialised; a null info pointer is allowed.
        let sig = unsafe { libc::sigwaitinfo(&raw const set, std::ptr::null_mut()) };
        if sig > 0 && sig != libc::SIGCHLD {
            for pid in children(std::process::id()) {
                // SAFETY: kill has no memory effects; a child that just exited gives ESRCH.
                unsafe { libc::kill(pid, sig) };
            }
        }
    }
}

/// Blocks `forwarded` and SIGCHLD, to be taken with sigwaitinfo; returns the set.
fn blocked(forwarded: &[libc::c_int]) -> io::Result<libc::sigset_t> {
    // SAFETY: sigemptyset initialises the set before any other use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t for these calls.
    unsafe {
        libc::sigemptyset(&raw mut set);
        for &s in forwarded.iter().chain(&[libc::SIGCHLD]) {
            libc::sigaddset(&raw mut set, s);
        }
    }
    // SAFETY: `set` is initialised; the old mask is not wanted.
    let rc =
        unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(set)
}

/// Reaps every exited child, keeping the last status; false once no child remains.
fn reap(last: &mut Option<libc::c_int>) -> io::Result<bool> {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes one int into `status`.
        let pid = unsafe { libc::waitpid(-1, &raw mut status, libc::WNOHANG) };
        match pid {
            0 => return Ok(true),
            p if p > 0 => {
                eprintln!("{NAME}: berth {p} ended ({})", describe(status));
                *last = Some(status);
            }
            _ => {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::ECHILD) => return Ok(false),
                    Some(libc::EINTR) => {}
                    _ => return Err(e),
                }
            }
        }
    }
}

/// The keeper's exit code for the last child's wait status: its exit code, 128 + the signal
/// that killed it (as a shell says it), or 1 when there was no child to wait for (the
/// successor had already gone: the unit is not serving).
fn exit_code(last: Option<libc::c_int>) -> u8 {
    match last {
        Some(s) if libc::WIFEXITED(s) => u8::try_from(libc::WEXITSTATUS(s)).unwrap_or(1),
        Some(s) if libc::WIFSIGNALED(s) => u8::try_from(128 + libc::WTERMSIG(s)).unwrap_or(1),
        _ => 1,
    }
}

fn describe(status: libc::c_int) -> String {
    if libc::WIFEXITED(status) {
        format!("exit code {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("signal {}", libc::WTERMSIG(status))
    } else {
        format!("status {status:#x}")
    }
}

/// The pids whose parent is `parent`, from /proc.
fn children(parent: u32) -> Vec<libc::pid_t> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let pid: libc::pid_t = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        (parent_of(&stat)? == parent).then_some(pid)
    })
    .collect()
}

/// The parent pid in a /proc/PID/stat line: the second field after the command, which is in
/// parentheses and may itself hold spaces and parentheses.
fn parent_of(stat: &str) -> Option<u32> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parent_is_read_past_a_command_with_spaces_and_parentheses() {
        assert_eq!(parent_of("42 (berth) S 7 42 42 0 -1"), Some(7));
        assert_eq!(parent_of("42 (a) b (c)) R 1234 1 1"), Some(1234));
        assert_eq!(parent_of("42 (berth"), None);
        assert_eq!(parent_of(""), None);
    }

    #[test]
    fn the_exit_code_is_the_last_berth_s() {
        // Wait statuses as the kernel encodes them: exit code << 8, or the signal number.
        assert_eq!(exit_code(Some(0)), 0);
        assert_eq!(exit_code(Some(3 << 8)), 3);
        assert_eq!(exit_code(Some(libc::SIGKILL)), 137);
        assert_eq!(exit_code(None), 1);
    }

    #[test]
    fn this_process_s_children_are_found() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let found = children(std::process::id());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(
            found.contains(&i32::try_from(child.id()).unwrap()),
            "{found:?}"
        );
    }
}
