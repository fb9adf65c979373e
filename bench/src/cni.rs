//! The hostPort contenders: CNI's reference `portmap` plugin (iptables) and `berth-cni`
//! (kernel mode through a `berth run` daemon), driven as a runtime drives a chained plugin:
//! ADD with a `prevResult` that describes the bench's server namespace on its bridge, and
//! DEL when the sample ends.
use std::{
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};
use berth::addr::Proto;
use serde_json::{Value, json};

/// Where the reference plugins are (Debian's containernetworking-plugins).
pub(crate) const PLUGIN_DIR: &str = "/usr/lib/cni";

/// One attachment's port mappings, added with ADD; DEL runs on drop.
#[derive(Debug)]
pub(crate) struct Attachment {
    plugin: PathBuf,
    conf: Value,
    id: String,
    netns: PathBuf,
}

/// What a runtime would pass as `prevResult` after the bridge plugin: the server's address
/// on eth0 inside its namespace, the bridge on the host side.
fn prev_result(server: SocketAddr, netns: &Path) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": crate::topo::bridge()},
            {"name": "eth0", "sandbox": netns},
        ],
        "ips": [{"address": format!("{}/24", server.ip()), "interface": 1}],
    })
}

impl Attachment {
    /// Runs `plugin` ADD for container `id` with `mappings` (host port → `server`'s port).
    /// `extra` adds keys to the plugin's configuration (berth-cni's admin socket).
    pub(crate) fn add(
        plugin: &Path,
        id: &str,
        proto: Proto,
        host_ports: &[u16],
        server: SocketAddr,
        netns: &Path,
        extra: &Value,
    ) -> anyhow::Result<Self> {
        let mappings: Vec<Value> = host_ports
            .iter()
            .map(|p| json!({"hostPort": p, "containerPort": server.port(), "protocol": proto.as_str()}))
            .collect();
        let mut conf = json!({
            "cniVersion": "1.0.0",
            "name": "bench",
            "type": plugin.file_name().and_then(|n| n.to_str()).unwrap_or("?"),
            "capabilities": {"portMappings": true},
            "runtimeConfig": {"portMappings": mappings},
            "prevResult": prev_result(server, netns),
        });
        if let (Some(c), Some(e)) = (conf.as_object_mut(), extra.as_object()) {
            c.extend(e.clone());
        }
        let a = Self {
            plugin: plugin.to_owned(),
            conf,
            id: id.to_owned(),
            netns: netns.to_owned(),
        };
        a.run("ADD")?;
        Ok(a)
    }

    fn run(&self, command: &str) -> anyhow::Result<()> {
        let mut child = Command::new(&self.plugin)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &self.id)
            .env("CNI_NETNS", &self.netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", PLUGIN_DIR)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run {}", self.plugin.display()))?;
        child
            .stdin
            .take()
            .context("no stdin")?
            .write_all(self.conf.to_string().as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "{} {command} failed: {}{}",
                self.plugin.display(),
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        let _ = self.run("DEL");
    }
}
