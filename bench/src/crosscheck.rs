//! The cross-check: iperf3 (one stream each way) and sockperf (TCP ping-pong, 64 B) through
//! the contenders, in the same topology, on the same ports' rotation and pinned to the same
//! CPU as the bench's own single-flow jobs, so that independent load tools confirm (or
//! contradict) the bench's ratios.
use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use berth::net::NetNs;

/// Server ports: iperf3 on `IPERF3_PORT + slot`, sockperf on `SOCKPERF_PORT + slot` (the
/// bench's own server has 7000 + slot).
pub(crate) const IPERF3_PORT: u16 = 7500;
pub(crate) const SOCKPERF_PORT: u16 = 7600;

/// A load tool's server in the container namespace, killed on drop.
pub(crate) struct Server {
    child: Child,
}

impl Server {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `cmd` (a server of `addr`) in `ns`, and waits until it listens there.
pub(crate) fn serve(
    ns: &NetNs,
    mut cmd: Command,
    addr: SocketAddr,
    logs: &Path,
) -> anyhow::Result<Server> {
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(logs.join("crosscheck-servers.log"))?;
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let child = ns
        .run(|| cmd.spawn())?
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    let mut server = Server { child };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ns.run(|| crate::procstat::is_listening(addr.port()))? {
        if let Some(status) = server.child.try_wait()? {
            bail!("{:?} exited ({status}) before listening", cmd.get_program());
        }
        if Instant::now() > deadline {
            bail!(
                "{:?} did not listen on {addr} within 10 s",
                cmd.get_program()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(server)
}

/// `iperf3 -s` for one test on `addr`.
pub(crate) fn iperf3_server(iperf3: &Path, addr: SocketAddr) -> Command {
    let mut cmd = Command::new(iperf3);
    cmd.args(["-s", "-1", "-B"])
        .arg(addr.ip().to_string())
        .arg("-p")
        .arg(addr.port().to_string());
    cmd
}

/// `sockperf server` over TCP on `addr`.
pub(crate) fn sockperf_server(sockperf: &Path, addr: SocketAddr) -> Command {
    let mut cmd = Command::new(sockperf);
    cmd.args(["server", "--tcp", "-i"])
        .arg(addr.ip().to_string())
        .arg("-p")
        .arg(addr.port().to_string());
    cmd
}

/// One iperf3 stream to `to` for `secs` (`reverse`: the server sends), in Gbit/s as received.
pub(crate) fn iperf3(
    iperf3: &Path,
    to: SocketAddr,
    secs: f64,
    reverse: bool,
) -> anyhow::Result<f64> {
    let mut cmd = Command::new(iperf3);
    cmd.arg("-c")
        .arg(to.ip().to_string())
        .arg("-p")
        .arg(to.port().to_string())
        .arg("-t")
        .arg(format!("{}", secs.ceil().max(1.0)))
        .arg("-J");
    if reverse {
        cmd.arg("-R");
    }
    let out = cmd.output().context("cannot run iperf3")?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 said: {}", String::from_utf8_lossy(&out.stderr)))?;
    if let Some(e) = json.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3: {e}");
    }
    json.pointer("/end/sum_received/bits_per_second")
        .and_then(serde_json::Value::as_f64)
        .map(|bps| bps / 1e9)
        .context("iperf3's report has no end.sum_received.bits_per_second")
}

/// A sockperf TCP ping-pong of 64-byte messages to `to` for `secs`: (p50, p99) in µs.
pub(crate) fn sockperf(sockperf: &Path, to: SocketAddr, secs: f64) -> anyhow::Result<(f64, f64)> {
    let out = Command::new(sockperf)
        .args(["ping-pong", "--tcp", "-m", "64", "-i"])
        .arg(to.ip().to_string())
        .arg("-p")
        .arg(to.port().to_string())
        .arg("-t")
        .arg(format!("{}", secs.ceil().max(1.0)))
        .output()
        .context("cannot run sockperf")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let p50 = percentile(&text, "50.000");
    let p99 = percentile(&text, "99.000");
    match (p50, p99) {
        (Some(a), Some(b)) => Ok((a, b)),
        _ => bail!("sockperf's report has no percentiles: {text}"),
    }
}

/// The value of sockperf's `---> percentile <p> = <µs>` line.
fn percentile(text: &str, p: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.split_once("percentile")?.1.trim_start();
        let (q, v) = rest.split_once('=')?;
        (q.trim() == p).then(|| v.trim().parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockperf_percentiles_are_read() {
        let text = "sockperf: ---> <MAX> observation =   75.873\n\
                    sockperf: ---> percentile 99.999 =   75.873\n\
                    sockperf: ---> percentile 99.000 =   21.110\n\
                    sockperf: ---> percentile 50.000 =   11.912\n";
        assert_eq!(percentile(text, "50.000"), Some(11.912));
        assert_eq!(percentile(text, "99.000"), Some(21.11));
        assert_eq!(percentile(text, "25.000"), None);
    }
}
