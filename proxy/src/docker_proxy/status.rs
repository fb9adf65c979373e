//! The fd 3 status pipe that dockerd reads to learn whether the proxy started.
use std::{
    fs::File,
    io::Write as _,
    os::fd::{FromRawFd as _, RawFd},
};

/// The fd dockerd passes for status.
pub const STATUS_FD: RawFd = 3;

/// The write end of the status pipe, if the parent passed one. Each message closes it, as
/// docker-proxy does, so that the parent's read returns.
#[derive(Debug)]
pub struct StatusPipe(Option<File>);

impl StatusPipe {
    /// Takes fd 3 if it is open. Call it once, before anything else can open fds.
    pub fn take() -> Self {
        // SAFETY: F_GETFD only queries whether fd 3 is open; it changes nothing.
        let open = unsafe { libc::fcntl(STATUS_FD, libc::F_GETFD) } != -1;
        if !open {
            return Self(None);
        }
        // Keep the pipe from leaking into children.
        // SAFETY: fd 3 is open and owned by nobody else in this process (nothing opened fds yet).
        unsafe { libc::fcntl(STATUS_FD, libc::F_SETFD, libc::FD_CLOEXEC) };
        // SAFETY: as above; the File becomes fd 3's only owner.
        Self(Some(unsafe { File::from_raw_fd(STATUS_FD) }))
    }

    /// True when a parent is listening on fd 3.
    pub fn is_attached(&self) -> bool {
        self.0.is_some()
    }

    /// Reports "listening".
    pub fn ok(&mut self) {
        self.send("0\n");
    }

    /// Reports a failure with its message (no trailing newline, like docker-proxy).
    pub fn fail(&mut self, message: &str) {
        self.send(&format!("1\n{message}"));
    }

    fn send(&mut self, msg: &str) {
        if let Some(mut f) = self.0.take() {
            let _ = f.write_all(msg.as_bytes());
        }
    }
}
