//! Every kind of configuration mistake gets its own message naming file, mapping and field.
use std::path::Path;

use super::*;
use crate::mapping::ModeChoice;

const FILE: &str = "/etc/berth/berth.toml";

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new(FILE), text)
}

fn error(text: &str) -> String {
    parse(text).unwrap_err().to_string()
}

#[test]
fn the_documented_example_parses_with_defaults() {
    let c = parse(
        r#"
[metrics]
listen = "127.0.0.1:9475"

[[mapping]]
name = "web"
proto = "tcp"            # tcp | udp
listen = "0.0.0.0:9091"
target = "172.16.1.1:8080"
mode = "auto"

[[mapping]]
name = "dns"
proto = "udp"
listen = "0.0.0.0:5353"
target = "172.16.1.1:53"
udp_idle_timeout = 30
max_flows = 100
"#,
    )
    .unwrap();
    assert_eq!(c.metrics_listen, Some("127.0.0.1:9475".parse().unwrap()));
    assert_eq!(c.admin_socket, Path::new(DEFAULT_ADMIN_SOCKET));
    let [web, dns] = &c.mappings[..] else {
        panic!("two mappings expected")
    };
    assert_eq!(
        (web.name.as_str(), web.proto, web.mode),
        ("web", Proto::Tcp, ModeChoice::Auto)
    );
    assert_eq!(web.mode.relay_mode(), Some(crate::relay::Mode::Splice));
    assert_eq!(
        web.max_connections,
        forward::Config::DEFAULT_MAX_CONNECTIONS
    );
    assert_eq!(dns.udp_idle_timeout, Duration::from_secs(30));
    assert_eq!(dns.max_flows, 100);
    assert_eq!(c.sockmap, crate::sockmap::Settings::default());
}

#[test]
fn the_sockmap_sizes_are_read_and_zero_keeps_autotuning() {
    let c = parse("[service]\nsockmap_max_entries = 1024\nsockmap_send_buffer = 0\n").unwrap();
    assert_eq!(
        c.sockmap,
        crate::sockmap::Settings {
            max_entries: 1024,
            send_buffer: 0,
            promote: crate::relay::Threshold::DEFAULT,
        }
    );
    let c = parse("[service]\nsockmap_promote_bytes = 0\nsockmap_promote_after = 0.5\n").unwrap();
    assert_eq!(
        c.sockmap.promote,
        crate::relay::Threshold {
            bytes: 0,
            age: Duration::from_millis(500)
        }
    );
    for (bad, why) in [
        ("sockmap_promote_bytes = -1", "-1 is not a number of bytes"),
        ("sockmap_promote_after = -2.0", "sockmap_promote_after"),
    ] {
        let e = parse(&format!("[service]\n{bad}\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(why), "{bad}: {e}");
    }
}

#[test]
fn an_empty_file_is_valid_and_the_metrics_endpoint_can_be_turned_off() {
    let c = parse("").unwrap();
    assert!(c.mappings.is_empty());
    assert_eq!(c.metrics_listen, DEFAULT_METRICS_LISTEN.parse().ok());
    let off = parse("[metrics]\nenabled = false\n").unwrap();
    assert_eq!(off.metrics_listen, None);
}

#[test]
fn each_mistake_names_file_mapping_and_field() {
    let m = |body: &str| format!("[[mapping]]\n{body}\n");
    let cases: Vec<(String, &str)> = vec![
        ("[[mapping]\n".into(), "/etc/berth/berth.toml: "),
        ("bogus = 1\n".into(), "unknown field `bogus`"),
        (
            m("name = \"w\"\nlisten = \"0.0.0.0:1\"\ntarget = \"10.0.0.1:1\"\nport = 3"),
            "unknown field `port`",
        ),
        (
            m("listen = \"0.0.0.0:1\"\ntarget = \"10.0.0.1:1\""),
            "mapping #1: name: missing",
        ),
        (
            m("name = \"a b\"\nlisten = \"0.0.0.0:1\"\ntarget = \"10.0.0.1:1\""),
            "mapping \"a b\": name: must be",
        ),
        (
            m("name = \"w\"\ntarget = \"10.0.0.1:1\""),
            "mapping \"w\": listen: missing",
        ),
        (
            m("name = \"w\"\nlisten = \"0.0.0.0\"\ntarget = \"10.0.0.1:1\""),
            "mapping \"w\": listen: invalid address \"0.0.0.0\"",
        ),
        (
            m("name = \"w\"\nlisten = \"0.0.0.0:1\"\ntarget = \"nope:1\""),
            "mapping \"w\": target: invalid address",
        ),
        (
            m("name = \"w\"\nlisten = \"0.0.0.0:1\"\ntarget = \"10.0.0.1:0\""),
            "mapping \"w\": target: 10.0.0.1:0 cannot be connected to",
        ),
        (
            m("name = \"w\"\nproto = \"sctp\"\nlisten = \"0.0.0.0:1\"\ntarget = \"10.0.0.1:1\""),
            "mapping \"w\": proto: unknown protocol \"sctp\"",
        ),
        (
            m("name = \"w\"\nmode = \"warp\"\nlisten = \"0.0.0.0:1\"\ntarget = \"10.0.0.1:1\""),
            "mapping \"w\": mode: unknown mode \"warp\"",
        ),
        (
            m("name = \"w\"\nmode = \"dnat\"\nlisten = \"0.0.0.0:1\"\ntarget = \"[::1]:1\""),
            "target: [::1]:1: kernel mode maps to a container's address",
        ),
        (
            m("name = \"w\"\nmode = \"dnat\"\nlisten = \"0.0.0.0:0\"\ntarget = \"10.0.0.1:1\""),
            "listen: 0.0.0.0:0: kernel mode needs an explicit port",
        ),
        (
            "[dnat]\ninterfaces = [\"this-name-is-far-too-long\"]\n".to_owned(),
            "[dnat] interfaces: \"this-name-is-far-too-long\" is not an interface name",
        ),
        (
            "[dnat]\ncgroup = \"relative/path\"\n".to_owned(),
            "[dnat] cgroup: relative/path is not an absolute path",
        ),
        (
            "[dnat]\npin_dir = \"berth\"\n".to_owned(),
            "[dnat] pin_dir: berth is not an absolute path",
        ),
        (
            "[dnat]\nconntrack_entries = 0\n".to_owned(),
            "[dnat] conntrack_entries: 0 is not a number from 1",
        ),
        (
            "[dnat]\nudp_timeout = -1\n".to_owned(),
            "[dnat] udp_timeout: -1 is not a number of seconds",
        ),
        (
            m(
                "name = \"w\"\nproto = \"udp\"\nmode = \"splice\"\nlisten = \"0.0.0.0:1\"\ntarget = \"10.0.0.1:1\"",
            ),
            "mode: \"splice\" applies to tcp",
        ),
        (
            m(
                "name = \"w\"\nproto = \"udp\"\nmax_connections = 5\nlisten = \"0.0.0.0:1\"\ntarget = \"10.0.0.1:1\"",
            ),
            "max_connections: applies to tcp mappings only",
        ),
        (
            m("name = \"w\"\nmax_flows = 5\nlisten = \"0.0.0.0:1\"\ntarget = \"10.0.0.1:1\""),
            "max_flows: applies to udp mappings only",
        ),
        (
            m("name = \"w\"\nmax_connections = 0\nlisten = \"0.0.0.0:1\"\ntarget = \"10.0.0.1:1\""),
            "max_connections: 0 is not a number from 1",
        ),
        (
            m(
                "name = \"w\"\nconnect_timeout = -1\nlisten = \"0.0.0.0:1\"\ntarget = \"10.0.0.1:1\"",
            ),
            "connect_timeout: -1 is not a number of seconds",
        ),
        (
            m("name = \"w\"\nlisten = 80\ntarget = \"10.0.0.1:1\""),
            "invalid type",
        ),
        (
            "[metrics]\nlisten = \"localhost\"\n".into(),
            "[metrics] listen: invalid address",
        ),
        (
            "[admin]\nsocket = \"admin.sock\"\n".into(),
            "[admin] socket: admin.sock is not an absolute path",
        ),
        (
            "[service]\ndrain_timeout = -3\n".into(),
            "[service] drain_timeout: -3 is not a number of seconds",
        ),
        (
            "[service]\nsockmap_send_buffer = -1\n".into(),
            "[service] sockmap_send_buffer: -1 is not a number of bytes from 0",
        ),
        (
            "[service]\nsockmap_send_buffer = 2147483648\n".into(),
            "[service] sockmap_send_buffer: 2147483648 is not a number of bytes",
        ),
    ];
    for (text, want) in cases {
        let got = error(&text);
        assert!(got.starts_with(FILE), "no file name in {got:?}");
        assert!(got.contains(want), "{text:?}:\n  got  {got}\n  want {want}");
    }
}

#[test]
fn kernel_mode_pins_under_its_admin_socket_unless_told_otherwise() {
    let admin = Path::new("/run/other/admin.sock");
    let default = parse("").unwrap().dnat_for(admin);
    assert_eq!(
        default.pin_dir.as_deref(),
        Some(Path::new("/sys/fs/bpf/berth/run-other-admin_sock"))
    );
    let set = parse("[dnat]\npin_dir = \"/sys/fs/bpf/mine\"\n").unwrap();
    assert_eq!(
        set.dnat_for(admin).pin_dir.as_deref(),
        Some(Path::new("/sys/fs/bpf/mine"))
    );
    let off = parse("[dnat]\npin_dir = \"\"\n").unwrap();
    assert_eq!(off.dnat_for(admin).pin_dir, None);
}

#[test]
fn clashing_names_and_addresses_are_refused() {
    let two = |a: &str, b: &str| {
        format!(
            "[[mapping]]\n{a}\ntarget = \"10.0.0.1:1\"\n[[mapping]]\n{b}\ntarget = \"10.0.0.1:1\"\n"
        )
    };
    let cases = [
        (
            two(
                "name = \"a\"\nlisten = \"0.0.0.0:80\"",
                "name = \"a\"\nlisten = \"0.0.0.0:81\"",
            ),
            "mapping \"a\": name: another mapping has the same name",
        ),
        (
            two(
                "name = \"a\"\nlisten = \"0.0.0.0:80\"",
                "name = \"b\"\nlisten = \"0.0.0.0:80\"",
            ),
            "mapping \"b\": listen: tcp 0.0.0.0:80 overlaps mapping \"a\"",
        ),
        (
            two(
                "name = \"a\"\nlisten = \"0.0.0.0:80\"",
                "name = \"b\"\nlisten = \"127.0.0.1:80\"",
            ),
            "overlaps mapping \"a\"",
        ),
        (
            two(
                "name = \"a\"\nlisten = \"0.0.0.0:9475\"",
                "name = \"b\"\nlisten = \"0.0.0.0:81\"",
            ),
            "overlaps the metrics endpoint",
        ),
    ];
    for (text, want) in cases {
        let got = error(&text);
        assert!(got.contains(want), "got {got}\nwant {want}");
    }
    // Same port, other protocol or other family: no clash.
    parse(&two(
        "name = \"a\"\nlisten = \"0.0.0.0:80\"",
        "name = \"b\"\nproto = \"udp\"\nlisten = \"0.0.0.0:80\"",
    ))
    .unwrap();
    parse(&two(
        "name = \"a\"\nlisten = \"0.0.0.0:80\"",
        "name = \"b\"\nlisten = \"[::]:80\"",
    ))
    .unwrap();
}
