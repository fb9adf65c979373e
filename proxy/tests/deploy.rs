//! The shipped deployment files agree with the build: the Kubernetes manifests parse, name
//! the image the Containerfile builds (at this version) and the binary it contains, give the
//! daemon a configuration that `berth check` accepts, mount what that configuration points at,
//! and run an init container whose command this berth accepts and performs. No root needed.
#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking, with the stack trace"
)]

use std::path::{Path, PathBuf};

use serde_yaml::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn manifests() -> Vec<Value> {
    let text = std::fs::read_to_string(repo().join("deploy/kubernetes/berth.yaml")).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

/// The binary and the image the Containerfile builds, from its COPY line.
fn containerfile() -> (String, String) {
    let text = std::fs::read_to_string(repo().join("deploy/kubernetes/Containerfile")).unwrap();
    let copy = text
        .lines()
        .find_map(|l| l.strip_prefix("COPY "))
        .expect("a COPY line");
    let mut parts = copy.split_whitespace();
    let (from, to) = (parts.next().unwrap(), parts.next().unwrap());
    (from.to_owned(), to.to_owned())
}

#[test]
fn kubernetes_manifests_match_the_build_and_the_config_checks() {
    let docs = manifests();
    assert!(
        kind(&docs, "ClusterRole").is_empty() && kind(&docs, "Role").is_empty(),
        "berth talks to no Kubernetes API: it needs no RBAC"
    );
    let ds = kind(&docs, "DaemonSet");
    assert_eq!(ds.len(), 1);
    let spec = &ds[0]["spec"]["template"]["spec"];
    assert_eq!(spec["hostNetwork"], true, "hostPorts are the node's");

    // The image is the one the Containerfile builds, at this version, and the commands run
    // the binary it copies, which the xtask static build writes.
    let (copied_from, binary) = containerfile();
    assert_eq!(copied_from, "target/release/static/berth");
    let xtask = std::fs::read_to_string(repo().join("xtask/src/exec.rs")).unwrap();
    assert!(
        xtask.contains("\"target/release/static\""),
        "the static build's directory moved"
    );
    let image = format!("localhost/berth:{}", env!("CARGO_PKG_VERSION"));
    let main = &spec["containers"][0];
    let init = &spec["initContainers"][0];
    for c in [main, init] {
        assert_eq!(c["image"].as_str(), Some(image.as_str()));
        assert_eq!(strings(&c["command"])[0], binary);
    }

    // The daemon's configuration passes `berth check`.
    let config_map = kind(&docs, "ConfigMap")[0];
    let toml = config_map["data"]["berth.toml"].as_str().unwrap();
    let dir = std::env::temp_dir().join(format!("berth-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("berth.toml");
    std::fs::write(&file, toml).unwrap();
    let config = berth::service::check(&file).unwrap();
    let main_cmd = strings(&main["command"]);
    assert_eq!(main_cmd[1..], ["run", "--config", "/etc/berth/berth.toml"]);

    // What the configuration and the plugin point at is mounted, from the host.
    let mounts: Vec<(String, String)> = main["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_owned(),
                m["mountPath"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let host_path = |volume: &str| -> Option<String> {
        spec["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| v["name"] == volume)
            .and_then(|v| v["hostPath"]["path"].as_str().map(str::to_owned))
    };
    let mounted_from_host = |inside: &Path| -> Option<String> {
        mounts
            .iter()
            .find(|(_, at)| inside.starts_with(at))
            .and_then(|(name, _)| host_path(name))
    };
    assert_eq!(
        mounted_from_host(&config.admin_socket).as_deref(),
        Some("/run/berth"),
        "the plugin on the host reaches the admin socket at /run/berth/admin.sock"
    );
    let cgroup = config.dnat.cgroup.clone().expect("[dnat] cgroup is set");
    assert_eq!(
        mounted_from_host(&cgroup).as_deref(),
        Some("/sys/fs/cgroup")
    );
    assert_eq!(
        mounted_from_host(Path::new("/sys/fs/bpf")).as_deref(),
        Some("/sys/fs/bpf")
    );
    let caps = strings(&main["securityContext"]["capabilities"]["add"]);
    for cap in ["BPF", "PERFMON", "NET_ADMIN"] {
        assert!(caps.iter().any(|c| c == cap), "{cap} missing: {caps:?}");
    }
    let ports = main["ports"].as_sequence().unwrap();
    let metrics = config.metrics_listen.expect("metrics enabled").port();
    assert!(
        ports
            .iter()
            .any(|p| p["containerPort"] == u64::from(metrics))
    );

    // The init container's command is one this berth accepts and carries out: run it with
    // its host directories moved into a scratch directory.
    let init_cmd = strings(&init["command"]);
    let scratch = |p: &str| dir.join(p.trim_start_matches('/')).display().to_string();
    let args: Vec<String> = init_cmd[1..]
        .iter()
        .map(|a| {
            if a.starts_with("/host/") {
                scratch(a)
            } else {
                a.clone()
            }
        })
        .collect();
    let conf_dir = dir.join("host/etc/cni/net.d");
    std::fs::create_dir_all(&conf_dir).unwrap();
    std::fs::write(
        conf_dir.join("10-k8s.conflist"),
        r#"{"cniVersion":"0.4.0","name":"k8s","plugins":[{"type":"bridge"},{"type":"portmap","capabilities":{"portMappings":true}}]}"#,
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.join("host/opt/cni/bin/berth-cni").is_file());
    let list = std::fs::read_to_string(conf_dir.join("10-k8s.conflist")).unwrap();
    assert!(
        list.contains("berth-cni") && !list.contains("portmap"),
        "{list}"
    );
    let init_mounts: Vec<&str> = init["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    for a in init_cmd.iter().filter(|a| a.starts_with("/host/")) {
        assert!(init_mounts.contains(&a.as_str()), "{a} is not mounted");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
