//! The admin socket: a Unix stream socket (mode 0600) where `berth status` and `berth reload`
//! send one line (`status` or `reload`) and read one JSON answer.
use std::{
    io,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};
use tracing::{debug, warn};

use super::status::Row;

/// The answer to one admin request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    /// What happened (reload), or why it failed.
    pub message: String,
    /// The mappings (status, and after a reload).
    pub mappings: Vec<Row>,
}

/// A request from the socket, for the service loop to answer.
#[derive(Debug)]
pub(crate) enum Request {
    Status(oneshot::Sender<Reply>),
    Reload(oneshot::Sender<Reply>),
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
    sock.listen(16).map_err(err)?;
    sock.set_nonblocking(true).map_err(err)?;
    UnixListener::from_std(std::os::unix::net::UnixListener::from(
        std::os::fd::OwnedFd::from(sock),
    ))
    .map_err(err)
}

/// Accepts admin connections and forwards their requests to the service loop.
pub(crate) async fn serve(listener: UnixListener, requests: mpsc::Sender<Request>) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                warn!(error = %e, "admin socket accept failed");
                continue;
            }
        };
        let requests = requests.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, requests).await {
                debug!(error = %e, "admin connection failed");
            }
        });
    }
}

async fn answer(stream: UnixStream, requests: mpsc::Sender<Request>) -> io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    // One short line; anything longer is not a command.
    BufReader::new(r.take(256)).read_line(&mut line).await?;
    let (tx, rx) = oneshot::channel();
    let request = match line.trim() {
        "status" => Some(Request::Status(tx)),
        "reload" => Some(Request::Reload(tx)),
        _ => None,
    };
    let stopping = || Reply {
        ok: false,
        message: "berth is stopping".into(),
        mappings: Vec::new(),
    };
    let reply = match request {
        Some(req) => match requests.send(req).await {
            Ok(()) => rx.await.unwrap_or_else(|_| stopping()),
            Err(_) => stopping(),
        },
        None => Reply {
            ok: false,
            message: format!(
                "unknown command {:?}: expected status or reload",
                line.trim()
            ),
            mappings: Vec::new(),
        },
    };
    let mut body = serde_json::to_vec(&reply).map_err(io::Error::other)?;
    body.push(b'\n');
    w.write_all(&body).await?;
    w.shutdown().await
}

/// Sends `command` to the berth serving `path` and returns its answer.
pub async fn request(path: &Path, command: &str) -> Result<Reply, AdminError> {
    let mut stream = UnixStream::connect(path)
        .await
        .map_err(|source| AdminError::Connect {
            path: path.to_owned(),
            source,
        })?;
    let bad = |why: String| AdminError::Answer {
        path: path.to_owned(),
        why,
    };
    stream
        .write_all(format!("{command}\n").as_bytes())
        .await
        .map_err(|e| bad(e.to_string()))?;
    let mut body = Vec::new();
    stream
        .read_to_end(&mut body)
        .await
        .map_err(|e| bad(e.to_string()))?;
    serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))
}
