//! The kernel-mode lab: a "host" namespace with a bridge and container namespaces, an
//! external-client namespace linked to it, and a child cgroup for the local programs. Torn
//! down on drop.
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use berth::net::{self, ContainerSpec, Topology};
use tokio::{
    net::{TcpListener, TcpStream, UdpSocket},
    sync::mpsc,
    time::timeout,
};

use super::{
    HANG, Tally, TestCgroup, TestNs,
    daemon::{Berth, Dir},
    serve_exchange, unique,
};

/// The host namespace with its bridge, containers, external client and cgroup.
pub struct Lab {
    pub topo: Topology,
    pub host: TestNs,
    pub ext: TestNs,
    pub cgroup: TestCgroup,
}

impl Lab {
    pub async fn up(containers: usize) -> Self {
        let host = TestNs::create();
        let ext = TestNs::create();
        let cgroup = TestCgroup::create();
        let specs: Vec<ContainerSpec> = (0..containers)
            .map(|_| ContainerSpec {
                name: unique("tc"),
                addr: None,
            })
            .collect();
        let topo =
            Topology::resolve(Some(&unique("tb")), Some("10.77.0.0/24"), None, &specs).unwrap();
        let lab = Self {
            topo,
            host,
            ext,
            cgroup,
        };
        let (topo, host_ns) = (lab.topo.clone(), lab.host.ns.clone());
        tokio::task::spawn_blocking(move || {
            host_ns
                .run_async(|| async move { net::up(&topo).await.unwrap() })
                .unwrap();
        })
        .await
        .unwrap();
        super::link_external(&lab.host, &lab.ext).await;
        lab
    }

    pub fn container_ip(&self, i: usize) -> Ipv4Addr {
        self.topo.containers[i].addr
    }

    /// `bind(container_ip:0)` run inside container `i`'s namespace.
    pub fn bind_in<T: Send>(
        &self,
        i: usize,
        bind: impl FnOnce(SocketAddr) -> std::io::Result<T> + Send,
    ) -> T {
        let addr = SocketAddr::from((self.container_ip(i), 0));
        net::NetNs::named(&self.topo.containers[i].name)
            .run(|| bind(addr))
            .unwrap()
            .unwrap()
    }

    /// A TCP server in container `i` that reports, per connection, the peer it saw and the
    /// checksummed exchange.
    pub fn tcp_server(
        &self,
        i: usize,
    ) -> (
        SocketAddr,
        mpsc::UnboundedReceiver<(SocketAddr, u64, Tally)>,
    ) {
        self.tcp_server_at(i, self.container_ip(i).into())
    }

    /// [`Lab::tcp_server`] on another address of container `i` (its IPv6 one).
    pub fn tcp_server_at(
        &self,
        i: usize,
        ip: std::net::IpAddr,
    ) -> (
        SocketAddr,
        mpsc::UnboundedReceiver<(SocketAddr, u64, Tally)>,
    ) {
        let std = net::NetNs::named(&self.topo.containers[i].name)
            .run(|| std::net::TcpListener::bind((ip, 0)))
            .unwrap()
            .unwrap();
        std.set_nonblocking(true).unwrap();
        let listener = TcpListener::from_std(std).unwrap();
        let local = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((stream, peer)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    if let Ok((id, tally)) = serve_exchange(stream).await {
                        let _ = tx.send((peer, id, tally));
                    }
                });
            }
        });
        (local, rx)
    }

    /// A UDP server in container `i` that answers each datagram with the sender's address.
    pub fn udp_server(&self, i: usize) -> SocketAddr {
        self.udp_server_at(i, self.container_ip(i).into())
    }

    /// [`Lab::udp_server`] on another address of container `i` (its IPv6 one).
    pub fn udp_server_at(&self, i: usize, ip: std::net::IpAddr) -> SocketAddr {
        let std = net::NetNs::named(&self.topo.containers[i].name)
            .run(|| std::net::UdpSocket::bind((ip, 0)))
            .unwrap()
            .unwrap();
        std.set_nonblocking(true).unwrap();
        let sock = UdpSocket::from_std(std).unwrap();
        let local = sock.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                let mut reply = buf[..n].to_vec();
                reply.extend_from_slice(format!(" from {from}").as_bytes());
                let _ = sock.send_to(&reply, from).await;
            }
        });
        local
    }

    /// A TCP connection from the external client namespace.
    pub async fn ext_connect(&self, addr: SocketAddr) -> TcpStream {
        let sock = self
            .ext
            .ns
            .run(|| tokio::net::TcpSocket::new_v4().unwrap())
            .unwrap();
        timeout(HANG, sock.connect(addr)).await.unwrap().unwrap()
    }

    /// A TCP socket of a local client: in the host namespace and in the test's cgroup.
    pub fn local_socket(&self, v6: bool) -> tokio::net::TcpSocket {
        self.host
            .ns
            .run(|| {
                self.cgroup.run(|| {
                    if v6 {
                        tokio::net::TcpSocket::new_v6().unwrap()
                    } else {
                        tokio::net::TcpSocket::new_v4().unwrap()
                    }
                })
            })
            .unwrap()
    }

    pub fn berth(&self, dir: &Dir, config: &str) -> Berth {
        Berth::spawn_in(&self.host.ns, dir, config)
    }

    /// A config file with kernel-mode `mappings` and `extra` lines in its `[dnat]` section.
    /// Nothing is pinned unless `extra` sets `pin_dir` (a host's /sys/fs/bpf is not the
    /// test's).
    pub fn config(&self, extra: &str, mappings: &[(&str, &str, SocketAddr, SocketAddr)]) -> String {
        let pin = if extra.contains("pin_dir") {
            ""
        } else {
            "pin_dir = \"\"\n"
        };
        let mut c = format!(
            "[metrics]\nenabled = false\n[dnat]\ncgroup = \"{}\"\nclosing_timeout = 0.2\nudp_timeout = 0.5\n{pin}{extra}\n",
            self.cgroup.0.display()
        );
        for (name, proto, listen, target) in mappings {
            c.push_str(&format!(
                "[[mapping]]\nname = \"{name}\"\nproto = \"{proto}\"\nlisten = \"{listen}\"\ntarget = \"{target}\"\nmode = \"dnat\"\n"
            ));
        }
        c
    }

    /// Adds IPv6 beside the lab's IPv4: fd00:77::1/64 on the bridge, fd00:77::2, ::3… on the
    /// containers ([`Lab::container6`]), fd00:99::1/64 on the uplink, fd00:99::2 on the
    /// external client, each with its default route. Returns (first container, host uplink,
    /// client) addresses.
    pub fn add_ipv6(&self) -> (Ipv6Addr, Ipv6Addr, Ipv6Addr) {
        let v6 = |s: &str| s.parse::<Ipv6Addr>().unwrap();
        let (bridge6, container6) = (v6("fd00:77::1"), self.container6(0));
        let (host6, client6) = (v6("fd00:99::1"), v6("fd00:99::2"));
        let bridge = self.topo.bridge.to_string();
        self.host
            .ns
            .run_async(|| async {
                let nl = net::Netlink::connect().unwrap();
                nl.add_addr(&bridge, bridge6.into(), 64).await.unwrap();
                nl.add_addr("ext0", host6.into(), 64).await.unwrap();
            })
            .unwrap();
        let containers: Vec<_> = (0..self.topo.containers.len())
            .map(|i| {
                (
                    net::NetNs::named(&self.topo.containers[i].name),
                    self.container6(i),
                    bridge6,
                )
            })
            .collect();
        for (ns, addr, gateway) in
            containers
                .iter()
                .map(|(ns, a, g)| (ns, *a, *g))
                .chain([(&self.ext.ns, client6, host6)])
        {
            ns.run_async(|| async move {
                let nl = net::Netlink::connect().unwrap();
                nl.add_addr("eth0", addr.into(), 64).await.unwrap();
                nl.add_default_route(gateway).await.unwrap();
            })
            .unwrap();
        }
        // Until duplicate address detection has finished on the new veths' link-local
        // addresses, the host cannot send neighbour solicitations from them, and the first
        // packet redirected towards an unresolved neighbour is lost.
        let deadline = std::time::Instant::now() + super::HANG;
        for ns in [&self.host.ns, &self.ext.ns]
            .into_iter()
            .chain(containers.iter().map(|(ns, _, _)| ns))
        {
            loop {
                let table = ns
                    .run(|| std::fs::read_to_string("/proc/thread-self/net/if_inet6"))
                    .unwrap()
                    .unwrap();
                // address ifindex prefix scope flags name; IFA_F_TENTATIVE is 0x40.
                let tentative = table.lines().any(|l| {
                    l.split_whitespace()
                        .nth(4)
                        .and_then(|f| u32::from_str_radix(f, 16).ok())
                        .is_some_and(|f| f & 0x40 != 0)
                });
                if !tentative {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "IPv6 DAD never finished"
                );
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        (container6, host6, client6)
    }

    /// Container `i`'s IPv6 address, once [`Lab::add_ipv6`] gave it one.
    pub fn container6(&self, i: usize) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 2 + i as u16)
    }

    /// `config` (from [`Lab::config`]) with /metrics on, at the returned address of the host
    /// namespace.
    pub fn with_metrics(&self, config: &str) -> (String, SocketAddr) {
        let metrics = SocketAddr::from(([127, 0, 0, 1], self.host.free_port()));
        let config = config.replace(
            "[metrics]\nenabled = false\n",
            &format!("[metrics]\nlisten = \"{metrics}\"\n"),
        );
        (config, metrics)
    }

    /// Programs attached at `iface`'s TC ingress (TCX) in the host namespace, by name.
    pub fn tc_programs(&self, iface: &str) -> Vec<String> {
        super::bpf::tc_programs(&self.host.ns, iface)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        super::tear_down(&self.topo, Some(self.host.ns.clone()));
    }
}
