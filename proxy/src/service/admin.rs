//! The admin socket: a Unix stream socket (mode 0600) that speaks the line protocol of
//! [`super::api`]: `berth status`, `berth reload`, the runtime mapping API, and the sockets
//! that come along with `add` requests (SCM_RIGHTS).
//!
//! What one client can do is bounded: [`super::api::MAX_LINE`] per line, [`LINE_TIMEOUT`] to
//! finish a line once begun, one socket per request, and a cap on connections.
use std::{
    io::{self, BufRead as _, IoSlice, IoSliceMut, Write as _},
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
        unix::fs::PermissionsExt as _,
    },
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, Interest},
    net::{UnixListener, UnixStream},
    sync::{Semaphore, mpsc, oneshot},
    task::JoinSet,
};
use tracing::{debug, warn};

pub use super::api::{Call, Reply};
use super::{
    api::MAX_LINE,
    handover::{Offer, Verdict},
};

/// How long a client may take to finish a line it has begun.
pub const LINE_TIMEOUT: Duration = Duration::from_secs(10);
/// Sockets accepted with one request: more is an error (and they are closed).
const MAX_FDS: usize = 1;

/// A request from the socket, for the service loop to answer.
#[derive(Debug)]
pub(crate) enum Request {
    Call {
        call: Box<Call>,
        /// The socket that came with the line, if any.
        socket: Option<OwnedFd>,
        /// The connection it came on (leases are tied to it).
        conn: u64,
        reply: oneshot::Sender<Reply>,
    },
    /// The connection closed: its leases end.
    Closed(u64),
    /// A successor asks for the sockets ([`super::handover`]).
    Handover {
        offer: oneshot::Sender<Result<Offer, String>>,
    },
}

/// The admin socket cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot create the admin socket {}: {source}", path.display())]
    Bind { path: PathBuf, source: io::Error },
    #[error(
        "cannot reach berth at {}: {source} (is `berth run` running, with this --admin-socket?)",
        path.display()
    )]
    Connect { path: PathBuf, source: io::Error },
    #[error("bad answer from berth at {}: {why}", path.display())]
    Answer { path: PathBuf, why: String },
}

impl AdminError {
    /// For `map_err` on connecting to the berth at `path`.
    pub(crate) fn connecting(path: &Path) -> impl FnOnce(io::Error) -> Self + '_ {
        move |source| Self::Connect {
            path: path.to_owned(),
            source,
        }
    }

    /// Builds the errors about a bad answer from the berth at `path`.
    pub(crate) fn answering(path: &Path) -> impl Fn(String) -> Self + '_ {
        move |why| Self::Answer {
            path: path.to_owned(),
            why,
        }
    }
}

/// Binds the admin socket (replacing a stale one), readable and writable by root only.
pub(crate) fn bind(path: &Path) -> Result<UnixListener, AdminError> {
    let err = |source| AdminError::Bind {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    // A socket file left by a crash would make bind fail; one with a live server behind it
    // means another berth is running, which must not be hijacked.
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another berth is serving it",
            )));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let sock = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM.cloexec(), None)
        .map_err(err)?;
    sock.bind(&socket2::SockAddr::unix(path).map_err(err)?)
        .map_err(err)?;
    // Before listen(): no one can connect while the mode is still the umask's.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    sock.listen(128).map_err(err)?;
    sock.set_nonblocking(true).map_err(err)?;
    UnixListener::from_std(std::os::unix::net::UnixListener::from(OwnedFd::from(sock))).map_err(err)
}

/// The admin listener a predecessor passed (a hand-over): the same socket, at `path`.
pub(crate) fn adopt(fd: OwnedFd, path: &Path) -> Result<UnixListener, AdminError> {
    let err = |source| AdminError::Bind {
        path: path.to_owned(),
        source,
    };
    let std = std::os::unix::net::UnixListener::from(fd);
    std.set_nonblocking(true).map_err(err)?;
    UnixListener::from_std(std).map_err(err)
}

/// Accepts admin connections (at most `max_conns` at once) and forwards their requests to the
/// service loop. Dropping the future closes every connection.
///
/// Once `handed_over` is notified it stops accepting (a successor accepts on the same
/// socket from then on) and serves the connections it has until it is dropped.
pub(crate) async fn serve(
    listener: UnixListener,
    requests: mpsc::Sender<Request>,
    max_conns: usize,
    handed_over: Arc<tokio::sync::Notify>,
) {
    let slots = Arc::new(Semaphore::new(max_conns));
    let ids = AtomicU64::new(1);
    let mut conns = JoinSet::new();
    let mut listener = Some(listener);
    loop {
        let accept = async {
            match &listener {
                Some(l) => l.accept().await,
                None => std::future::pending().await,
            }
        };
        let accepted = tokio::select! {
            a = accept => a,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            () = handed_over.notified(), if listener.is_some() => {
                listener = None;
                continue;
            }
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                warn!(error = %e, "admin socket accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            warn!(max_conns, "admin connection refused: too many open");
            conns.spawn(async move {
                let _ = write_reply(&stream, &Reply::error("too many admin connections")).await;
            });
            continue;
        };
        let conn = ids.fetch_add(1, Ordering::Relaxed);
        let requests = requests.clone();
        conns.spawn(async move {
            if let Err(e) = connection(&stream, conn, &requests).await {
                debug!(error = %e, conn, "admin connection failed");
            }
            let _ = requests.send(Request::Closed(conn)).await;
            drop(slot);
        });
    }
}

/// Answers the requests of one connection, in order, until it closes.
async fn connection(
    stream: &UnixStream,
    conn: u64,
    requests: &mpsc::Sender<Request>,
) -> io::Result<()> {
    let mut buf: Vec<u8> = Vec::new();
    let mut fds: Vec<OwnedFd> = Vec::new();
    loop {
        while let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            // The sockets that arrived so far came with this line. Answered in a future of
            // its own: an idle connection (a lease, held for days) keeps only its read state.
            let passed = std::mem::take(&mut fds);
            if line.trim_ascii() == b"handover" {
                // The connection is the hand-over's from here to its end.
                return hand_over(stream, std::mem::take(&mut buf), requests).await;
            }
            let reply = Box::pin(answer(&line, passed, conn, requests)).await;
            write_reply(stream, &reply).await?;
        }
        if buf.is_empty() {
            // An idle connection (a lease held for days) keeps no buffer.
            buf = Vec::new();
        }
        if buf.len() >= MAX_LINE {
            let why = format!("request line longer than {MAX_LINE} bytes; closing");
            write_reply(stream, &Reply::error(why)).await?;
            return Ok(());
        }
        let read = if buf.is_empty() {
            recv(stream, &mut buf, &mut fds).await?
        } else if let Ok(r) = Box::pin(tokio::time::timeout(
            LINE_TIMEOUT,
            recv(stream, &mut buf, &mut fds),
        ))
        .await
        {
            r?
        } else {
            let why = format!("request line not finished within {LINE_TIMEOUT:?}; closing");
            write_reply(stream, &Reply::error(why)).await?;
            return Ok(());
        };
        if read == 0 {
            return Ok(());
        }
        if fds.len() > MAX_FDS + 3 {
            write_reply(stream, &Reply::error("too many sockets passed; closing")).await?;
            return Ok(());
        }
    }
}

/// How long a successor may take between receiving the sockets and serving them.
const SUCCESSOR_TIMEOUT: Duration = Duration::from_secs(120);

/// Serves a successor's hand-over request (see [`super::handover`]): passes the sockets the
/// service offers, then waits for the successor to say it serves them, and tells the service.
async fn hand_over(
    stream: &UnixStream,
    mut buf: Vec<u8>,
    requests: &mpsc::Sender<Request>,
) -> io::Result<()> {
    let (tx, rx) = oneshot::channel();
    if requests
        .send(Request::Handover { offer: tx })
        .await
        .is_err()
    {
        return write_reply(stream, &Reply::error("berth is stopping")).await;
    }
    let offer = match rx.await {
        Ok(Ok(o)) => o,
        Ok(Err(why)) => return write_reply(stream, &Reply::error(why)).await,
        Err(_) => return write_reply(stream, &Reply::error("berth is stopping")).await,
    };
    let Offer { sockets, verdict } = offer;
    if let Err(e) = super::handover::send_sockets(stream, &sockets).await {
        let _ = verdict.send(Verdict::Aborted(format!("cannot pass the sockets: {e}")));
        return Err(e);
    }
    // Our copies go now: the successor holds its own, and an abort must not leave them here.
    drop(sockets);
    let mut fds = Vec::new();
    let line = tokio::time::timeout(SUCCESSOR_TIMEOUT, async {
        loop {
            if let Some(end) = buf.iter().position(|&b| b == b'\n') {
                return Ok(buf.drain(..=end).collect::<Vec<u8>>());
            }
            if recv(stream, &mut buf, &mut fds).await? == 0 {
                return Ok(Vec::new());
            }
        }
    })
    .await;
    let line: io::Result<Vec<u8>> = line.unwrap_or_else(|_| Ok(b"(timed out)".to_vec()));
    match line {
        Ok(l) if l.trim_ascii() == b"ready" => {
            let pid = stream
                .peer_cred()
                .ok()
                .and_then(|c| c.pid())
                .and_then(|p| u32::try_from(p).ok());
            let (ack, acked) = oneshot::channel();
            if verdict.send(Verdict::Ready { pid, ack }).is_ok() && acked.await.is_ok() {
                write_reply(stream, &Reply::ok("handed over", Vec::new())).await?;
            }
            Ok(())
        }
        Ok(l) => {
            let why = if l.is_empty() {
                "the successor went away".to_owned()
            } else {
                format!(
                    "the successor said {:?}",
                    String::from_utf8_lossy(l.trim_ascii())
                )
            };
            let _ = verdict.send(Verdict::Aborted(why));
            Ok(())
        }
        Err(e) => {
            let _ = verdict.send(Verdict::Aborted(e.to_string()));
            Err(e)
        }
    }
}

/// The answer to one request line, with the sockets that came with it.
async fn answer(
    line: &[u8],
    mut passed: Vec<OwnedFd>,
    conn: u64,
    requests: &mpsc::Sender<Request>,
) -> Reply {
    let Ok(text) = std::str::from_utf8(line) else {
        return Reply::error("the request is not UTF-8");
    };
    if passed.len() > MAX_FDS {
        return Reply::error(format!(
            "{} sockets came with one request; an add takes one",
            passed.len()
        ));
    }
    let call = match Call::parse(text) {
        Ok(call) => call,
        Err(why) => return Reply::error(why),
    };
    if !passed.is_empty() && !matches!(call, Call::Add { .. }) {
        return Reply::error("a socket came with a request that takes none");
    }
    let (tx, rx) = oneshot::channel();
    let req = Request::Call {
        call: Box::new(call),
        socket: passed.pop(),
        conn,
        reply: tx,
    };
    match requests.send(req).await {
        Ok(()) => rx
            .await
            .unwrap_or_else(|_| Reply::error("berth is stopping")),
        Err(_) => Reply::error("berth is stopping"),
    }
}

/// Reads what is there (bytes into `buf`, passed sockets into `fds`); 0 at end of stream.
async fn recv(stream: &UnixStream, buf: &mut Vec<u8>, fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    loop {
        stream.readable().await?;
        // The read buffer lives on the worker's stack (inside `receive`), not in the future:
        // a thousand idle connections (one per Docker shim) must not hold one each.
        match stream.try_io(Interest::READABLE, || receive(stream.as_raw_fd(), buf, fds)) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// One `recvmsg` on the Unix stream socket `fd`: bytes into `bytes`, passed descriptors into
/// `fds`; 0 at end of stream.
pub(crate) fn receive(fd: RawFd, bytes: &mut Vec<u8>, fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut chunk = [0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut chunk)];
    // A hand-over passes up to 64 descriptors per message.
    let mut space = nix::cmsg_space!([RawFd; 64]);
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(io::Error::from)?;
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: the kernel just installed these descriptors for this process alone.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    let n = msg.bytes;
    bytes.extend_from_slice(&chunk[..n]);
    Ok(n)
}

/// Boxed: it is rare next to waiting, and an idle connection should not carry its room.
pub(crate) fn write_reply<'a>(
    stream: &'a UnixStream,
    reply: &'a Reply,
) -> std::pin::Pin<Box<impl Future<Output = io::Result<()>> + 'a>> {
    Box::pin(write_reply_now(stream, reply))
}

async fn write_reply_now(stream: &UnixStream, reply: &Reply) -> io::Result<()> {
    let mut body = serde_json::to_vec(reply).map_err(io::Error::other)?;
    body.push(b'\n');
    let mut rest = &body[..];
    while !rest.is_empty() {
        stream.writable().await?;
        match stream.try_write(rest) {
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sends `command` (a word or a JSON request) to the berth serving `path` and returns its
/// answer. For `berth status`, `berth reload` and tests; holds no lease.
pub async fn request(path: &Path, command: &str) -> Result<Reply, AdminError> {
    let mut stream = UnixStream::connect(path)
        .await
        .map_err(AdminError::connecting(path))?;
    let bad = AdminError::answering(path);
    stream
        .write_all(format!("{}\n", command.trim_end()).as_bytes())
        .await
        .map_err(|e| bad(e.to_string()))?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .await
        .map_err(|e| bad(e.to_string()))?;
    if line.is_empty() {
        return Err(bad("the connection closed without an answer".into()));
    }
    serde_json::from_str(&line).map_err(|e| bad(e.to_string()))
}

/// A blocking client that keeps its connection (and so its leases) open: what
/// `berth-docker-proxy` holds while it waits, with no runtime and no threads.
#[derive(Debug)]
pub struct Client {
    path: PathBuf,
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
}

impl Client {
    /// How long a call waits for its answer.
    pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

    pub fn connect(path: &Path) -> Result<Self, AdminError> {
        let stream =
            std::os::unix::net::UnixStream::connect(path).map_err(AdminError::connecting(path))?;
        let _ = stream.set_read_timeout(Some(Self::ANSWER_TIMEOUT));
        Ok(Self {
            path: path.to_owned(),
            // Answers are short; a waiting shim keeps this buffer for life.
            reader: std::io::BufReader::with_capacity(256, stream),
        })
    }

    /// The connection, for polling: it becomes readable (end of stream) when berth goes away.
    pub fn fd(&self) -> BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(self.reader.get_ref())
    }

    /// Sends `call` (with `socket` attached, if any) and waits for the answer.
    pub fn call(
        &mut self,
        call: &Call,
        socket: Option<BorrowedFd<'_>>,
    ) -> Result<Reply, AdminError> {
        let bad = AdminError::answering(&self.path);
        let mut line = serde_json::to_vec(call).map_err(|e| bad(e.to_string()))?;
        line.push(b'\n');
        let stream = self.reader.get_ref();
        let raw = socket.map(|s| [s.as_raw_fd()]);
        let cmsgs: Vec<ControlMessage<'_>> = raw
            .as_ref()
            .map(|r| vec![ControlMessage::ScmRights(r)])
            .unwrap_or_default();
        // The socket rides on the first bytes; the rest of a long line follows plainly.
        let sent = sendmsg::<()>(
            stream.as_raw_fd(),
            &[IoSlice::new(&line)],
            &cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(|e| bad(format!("cannot send: {e}")))?;
        let mut writer = stream;
        writer
            .write_all(&line[sent..])
            .map_err(|e| bad(format!("cannot send: {e}")))?;
        let mut answer = String::new();
        let n = self
            .reader
            .read_line(&mut answer)
            .map_err(|e| bad(format!("no answer: {e}")))?;
        if n == 0 {
            return Err(bad("the connection closed without an answer".into()));
        }
        serde_json::from_str(&answer).map_err(|e| bad(e.to_string()))
    }
}
