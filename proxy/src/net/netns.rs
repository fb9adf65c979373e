//! Named network namespaces, kept alive by a bind mount under /run/netns as iproute2 does, so
//! that `ip netns list` and `ip netns exec` see them; and ways to run code inside one.
use std::{
    fs, io,
    os::{
        fd::{AsFd, AsRawFd, OwnedFd},
        unix::{fs::OpenOptionsExt, process::CommandExt},
    },
    path::{Path, PathBuf},
    process::Command,
    thread,
};

use nix::{
    mount::{MntFlags, MsFlags, mount, umount2},
    sched::{CloneFlags, setns, unshare},
};

use super::NetError;

/// Where iproute2 keeps its named namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// A network namespace named by a file under [`NETNS_RUN_DIR`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetNs {
    name: String,
    path: PathBuf,
}

impl NetNs {
    /// Refers to a namespace by name; it need not exist yet.
    pub fn named(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            path: Path::new(NETNS_RUN_DIR).join(name),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True when the name is bound to a live namespace (not merely a leftover file).
    pub fn exists(&self) -> bool {
        self.open().is_ok()
    }

    /// Creates the namespace, like `ip netns add NAME`.
    pub fn create(name: &str) -> Result<Self, NetError> {
        let ns = Self::named(name);
        ensure_run_dir()?;
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o444)
            .open(&ns.path)
        {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(NetError::AlreadyExists {
                    what: "network namespace",
                    name: name.to_owned(),
                });
            }
            Err(e) => return Err(NetError::io(format!("create {}", ns.path.display()), e)),
        }
        // unshare() moves only the calling thread, so do it on a throwaway thread and pin the
        // new namespace with a bind mount before the thread (its last user) exits.
        let path = ns.path.clone();
        let bound = thread::spawn(move || -> Result<(), NetError> {
            unshare(CloneFlags::CLONE_NEWNET)
                .map_err(|e| NetError::io("unshare(CLONE_NEWNET)", e))?;
            mount(
                Some("/proc/thread-self/ns/net"),
                &path,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| NetError::io(format!("bind-mount namespace on {}", path.display()), e))
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p));
        if let Err(e) = bound {
            let _ = fs::remove_file(&ns.path);
            return Err(e);
        }
        // A fresh namespace has `lo` down; every user wants it up.
        ns.run_async(|| async { super::Netlink::connect()?.set_up("lo").await })??;
        Ok(ns)
    }

    /// Removes the namespace, like `ip netns delete NAME`. A missing one is not an error.
    pub fn delete(&self) -> Result<(), NetError> {
        match umount2(&self.path, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => {}
            Err(e) => return Err(NetError::io(format!("unmount {}", self.path.display()), e)),
        }
        match fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(NetError::io(format!("remove {}", self.path.display()), e)),
        }
    }

    /// Opens the namespace file, for setns(2) or to move a link into it.
    pub fn open(&self) -> Result<OwnedFd, NetError> {
        let file = fs::File::open(&self.path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => NetError::NoSuchNamespace(self.name.clone()),
            _ => NetError::io(format!("open {}", self.path.display()), e),
        })?;
        // A plain file left behind without its mount is not a namespace.
        let fd = OwnedFd::from(file);
        if nix::sys::statfs::fstatfs(&fd).map(|s| s.filesystem_type().0) != Ok(libc::NSFS_MAGIC) {
            return Err(NetError::NoSuchNamespace(self.name.clone()));
        }
        Ok(fd)
    }

    /// Runs `f` on a dedicated thread that has entered this namespace and returns its result.
    ///
    /// Sockets created by `f` stay in this namespace after it returns, so this is also how a
    /// listener or a client socket is made "inside a container".
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, NetError> {
        let fd = self.open()?;
        thread::scope(|s| {
            s.spawn(move || {
                setns(fd.as_fd(), CloneFlags::CLONE_NEWNET)
                    .map_err(|e| NetError::io("setns", e))?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// Like [`Self::run`], for async code: `f`'s future runs on a current-thread runtime there.
    pub fn run_async<F, Fut, T>(&self, f: F) -> Result<T, NetError>
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = T>,
        T: Send,
    {
        self.run(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| NetError::io("start a runtime", e))?;
            Ok(rt.block_on(f()))
        })?
    }

    /// A command that will run inside this namespace, like `ip netns exec NAME CMD`.
    ///
    /// Unlike iproute2, /sys is not remounted and /etc/netns is not bind-mounted: berth's
    /// containers need neither.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command, NetError> {
        let fd = self.open()?;
        let mut cmd = Command::new(program);
        // SAFETY: setns(2) is async-signal-safe, allocates nothing and only touches the child.
        unsafe {
            cmd.pre_exec(move || {
                let rc = libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET);
                if rc == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            });
        }
        Ok(cmd)
    }
}

/// Makes /run/netns exist and be a shared mount, so that namespace bind mounts made here
/// propagate to other mount namespaces (as `ip netns add` does).
fn ensure_run_dir() -> Result<(), NetError> {
    fs::create_dir_all(NETNS_RUN_DIR)
        .map_err(|e| NetError::io(format!("create {NETNS_RUN_DIR}"), e))?;
    let shared = || {
        mount(
            None::<&str>,
            NETNS_RUN_DIR,
            Some("none"),
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match shared() {
        Ok(()) => Ok(()),
        // Not a mount point yet: bind it onto itself first, then mark it shared.
        Err(nix::errno::Errno::EINVAL) => mount(
            Some(NETNS_RUN_DIR),
            NETNS_RUN_DIR,
            Some("none"),
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .and_then(|()| shared())
        .map_err(|e| NetError::io(format!("make {NETNS_RUN_DIR} a shared mount"), e)),
        Err(e) => Err(NetError::io(
            format!("make {NETNS_RUN_DIR} a shared mount"),
            e,
        )),
    }
}
