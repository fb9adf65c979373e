//! A contender for the benchmark: the smallest TCP proxy on `tokio-splice`'s
//! `zero_copy_bidirectional` (a 64 KiB pipe per direction, made per connection), to measure
//! berth's own splice pump (pooled 1 MiB pipes, drained until EAGAIN) against the crate the
//! design card named. Usage: `tokio-splice-proxy LISTEN TARGET`.
use std::net::SocketAddr;

use anyhow::Context as _;
use tokio::net::{TcpListener, TcpStream};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(target), None) = (args.next(), args.next(), args.next()) else {
        anyhow::bail!("usage: tokio-splice-proxy LISTEN TARGET (IP:PORT each)");
    };
    let listen: SocketAddr = listen.parse().context("LISTEN")?;
    let target: SocketAddr = target.parse().context("TARGET")?;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("bind {listen}"))?;
    loop {
        let (mut client, _) = listener.accept().await.context("accept")?;
        tokio::spawn(async move {
            let Ok(mut server) = TcpStream::connect(target).await else {
                return;
            };
            // As berth and docker-proxy do: request-response traffic is not held back.
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let _ = tokio_splice::zero_copy_bidirectional(&mut client, &mut server).await;
        });
    }
}
