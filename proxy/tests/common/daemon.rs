//! `berth run` as a child process for tests: a scratch directory, addresses for config files,
//! the process with its admin socket, and a metrics scrape.
use std::{
    net::SocketAddr,
    os::fd::{AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use berth::service::admin;
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    time::timeout,
};

use super::HANG;

/// A scratch directory for config, admin socket and notify socket; removed on drop.
pub struct Dir(pub PathBuf);

impl Dir {
    pub fn new() -> Self {
        let p = std::env::temp_dir().join(super::unique("bs"));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Unmounts whatever a container engine mounted under this directory (deepest first),
    /// so that it can be removed.
    pub fn unmount_all(&self) {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let root = self.0.display().to_string();
        let mut ours: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| m.starts_with(&root))
            .collect();
        ours.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in ours {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An address that was free a moment ago, on a loopback address of this test's own
/// (127.N.M.1): config files need fixed ports, and other tests binding 127.0.0.1:0 at the same
/// time can then never take the port from under it.
pub fn free_addr() -> SocketAddr {
    static NEXT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let ip = std::net::Ipv4Addr::new(127, 1 + (std::process::id() % 250) as u8, n, 1);
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
}

pub fn mapping(name: &str, listen: SocketAddr, target: SocketAddr, extra: &str) -> String {
    format!(
        "[[mapping]]\nname = \"{name}\"\nlisten = \"{listen}\"\ntarget = \"{target}\"\n{extra}\n"
    )
}

/// `berth run` with its log piped, optionally with a notify socket and systemd's fds.
pub struct Berth {
    pub child: Child,
    pub admin: PathBuf,
    /// Its configuration file, in the scratch directory.
    pub file: PathBuf,
}

impl Berth {
    /// `berth run` inside network namespace `ns` (a test's "host"), with `config` in `dir`.
    pub fn spawn_in(ns: &berth::net::NetNs, dir: &Dir, config: &str) -> Self {
        let file = dir.path("berth.toml");
        std::fs::write(&file, config).unwrap();
        let admin = dir.path("admin.sock");
        let child = ns
            .command(env!("CARGO_BIN_EXE_berth"))
            .unwrap()
            .args(["run", "--config"])
            .arg(&file)
            .arg("--admin-socket")
            .arg(&admin)
            .env("BERTH_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        Self { child, admin, file }
    }

    /// The status rows (empty while berth does not answer).
    pub async fn rows(&self) -> Vec<berth::service::status::Row> {
        timeout(HANG, admin::request(&self.admin, "status"))
            .await
            .unwrap()
            .map(|r| r.mappings)
            .unwrap_or_default()
    }

    pub async fn row(&self, name: &str) -> berth::service::status::Row {
        self.rows()
            .await
            .into_iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("no mapping {name}"))
    }

    /// Polls status until mapping `name` satisfies `pred` (state berth updates; no event).
    pub async fn wait_row(
        &self,
        name: &str,
        what: &str,
        pred: impl Fn(&berth::service::status::Row) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + HANG;
        loop {
            let rows = self.rows().await;
            if rows.iter().any(|r| r.name == name && pred(r)) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "mapping {name} never got {what}: {rows:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Writes `config` and reloads.
    pub async fn reload(&self, config: &str) -> admin::Reply {
        std::fs::write(&self.file, config).unwrap();
        self.request("reload").await
    }

    /// SIGTERM, then waits (with a deadline) for a clean exit.
    pub async fn stop(mut self) {
        self.signal(Signal::SIGTERM);
        let deadline = tokio::time::Instant::now() + HANG;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "berth run did not stop"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert!(status.success(), "berth run exited with {status}");
    }

    pub fn spawn(dir: &Dir, config: &str, notify: Option<&Path>, fds: Vec<OwnedFd>) -> Self {
        let file = dir.path("berth.toml");
        std::fs::write(&file, config).unwrap();
        let admin = dir.path("admin.sock");
        // LISTEN_PID must be berth's own pid: let a shell set it to $$ and exec berth.
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(if fds.is_empty() {
                "exec \"$0\" \"$@\""
            } else {
                "LISTEN_PID=$$ exec \"$0\" \"$@\""
            })
            .arg(env!("CARGO_BIN_EXE_berth"))
            .args(["run", "--config"])
            .arg(&file)
            .arg("--admin-socket")
            .arg(&admin)
            .env("BERTH_LOG", "warn")
            .env_remove("LISTEN_PID")
            .stdin(Stdio::null())
            .stderr(Stdio::inherit());
        if let Some(n) = notify {
            cmd.env("NOTIFY_SOCKET", n);
        }
        if !fds.is_empty() {
            let names: Vec<String> = (0..fds.len()).map(|i| format!("m{i}")).collect();
            cmd.env("LISTEN_FDS", fds.len().to_string())
                .env("LISTEN_FDNAMES", names.join(":"));
            super::place_fds(
                &mut cmd,
                (3..).zip(&fds).map(|(to, f)| (f.as_raw_fd(), to)).collect(),
            );
        }
        let child = cmd.spawn().unwrap();
        drop(fds);
        Self { child, admin, file }
    }

    pub async fn request(&self, command: &str) -> admin::Reply {
        timeout(HANG, admin::request(&self.admin, command))
            .await
            .unwrap()
            .unwrap()
    }

    /// Waits until the admin socket answers (berth is up, everything bound).
    /// Waits until berth serves: its admin socket exists before the mappings start, but
    /// answers only once they run.
    pub async fn up(&self) {
        super::wait_until("berth to create its admin socket", || {
            std::os::unix::net::UnixStream::connect(&self.admin).is_ok()
        })
        .await;
        self.request("status").await;
    }

    /// Polls `berth status` until a mapping row satisfies `pred` (state another process
    /// updates; there is no event to await).
    pub async fn wait_status(&self, pred: impl Fn(&berth::service::status::Row) -> bool) {
        let deadline = tokio::time::Instant::now() + HANG;
        loop {
            if let Ok(r) = admin::request(&self.admin, "status").await
                && r.mappings.iter().any(&pred)
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "status never matched"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    pub fn signal(&self, s: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), s).unwrap();
    }

    pub async fn exit_code(mut self) -> Option<i32> {
        tokio::task::spawn_blocking(move || self.child.wait().unwrap().code())
            .await
            .unwrap()
    }
}

impl Drop for Berth {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Scrapes `/metrics` with a plain HTTP/1.1 request.
pub async fn scrape(addr: SocketAddr) -> String {
    let s = TcpStream::connect(addr).await.unwrap();
    scrape_over(s).await
}

/// [`scrape`] from inside network namespace `ns` (a daemon that runs there).
pub async fn scrape_in(ns: &berth::net::NetNs, addr: SocketAddr) -> String {
    let sock = ns.run(|| tokio::net::TcpSocket::new_v4().unwrap()).unwrap();
    let s = timeout(HANG, sock.connect(addr)).await.unwrap().unwrap();
    scrape_over(s).await
}

async fn scrape_over(mut s: TcpStream) -> String {
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: berth\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    timeout(HANG, s.read_to_string(&mut body))
        .await
        .unwrap()
        .unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    body
}

/// The value of the sample `name{labels}` (labels in the encoder's sorted order).
pub fn sample(metrics: &str, name_and_labels: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name_and_labels} in:\n{metrics}"))
}

/// The value of the first sample of family `name` whose labels contain every one of
/// `labels` (`mapping="web"`, ...), if there is one: for families with many labels.
pub fn find_sample(metrics: &str, name: &str, labels: &[&str]) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?.strip_prefix('{')?;
        let (set, value) = rest.split_once('}')?;
        labels
            .iter()
            .all(|want| set.split(',').any(|have| have == *want))
            .then(|| value.trim().parse().ok())?
    })
}

// === berth-docker-proxy ===

/// Spawns berth-docker-proxy with `fds` placed at the given numbers (fd 3, fd 4, …), looking
/// for its daemon at `admin`.
pub fn shim(args: &[&str], admin: &Path, fds: Vec<(OwnedFd, std::os::fd::RawFd)>) -> super::Guard {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_berth-docker-proxy"));
    cmd.args(args)
        .env("BERTH_ADMIN_SOCKET", admin)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    super::place_fds(
        &mut cmd,
        fds.iter().map(|(fd, to)| (fd.as_raw_fd(), *to)).collect(),
    );
    let child = super::Guard(cmd.spawn().unwrap());
    drop(fds); // the parent's copies: the status pipe must see EOF once the child closes it
    child
}

/// Spawns with a status pipe on fd 3 (plus `extra` fds) and returns what the child reported.
pub fn shim_with_status(
    args: &[&str],
    admin: &Path,
    mut extra: Vec<(OwnedFd, std::os::fd::RawFd)>,
) -> (super::Guard, String) {
    use std::io::Read as _;
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    extra.push((w, 3));
    let child = shim(args, admin, extra);
    let mut status = String::new();
    std::fs::File::from(r).read_to_string(&mut status).unwrap();
    (child, status)
}

/// `berth upgrade` against the daemon at `admin`: its exit status and output.
pub async fn upgrade(admin: &Path) -> (bool, String) {
    let admin = admin.to_owned();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_berth"))
            .arg("upgrade")
            .arg("--admin-socket")
            .arg(admin)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    super::outcome(&out)
}

/// The successor's pid in `berth upgrade`'s answer ("handed over to pid N").
pub fn successor_pid(out: &str) -> i32 {
    out.trim()
        .rsplit(' ')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {out:?}"))
}
