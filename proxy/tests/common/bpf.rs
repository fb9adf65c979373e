//! What kernel mode left in the kernel, for the tests that check it: programs on a TC hook or
//! a cgroup, and entries in the conntrack maps.
use std::{os::fd::AsRawFd as _, path::Path};

use berth::net::NetNs;

/// Programs attached at `iface`'s TC ingress (TCX) in namespace `ns`, by name.
pub fn tc_programs(ns: &NetNs, iface: &str) -> Vec<String> {
    let iface = iface.to_owned();
    ns.run(move || {
        let (_, progs) =
            aya::programs::SchedClassifier::query_tcx(&iface, aya::programs::TcAttachType::Ingress)
                .unwrap();
        progs
            .iter()
            .map(|p| p.name_as_str().unwrap_or("?").to_owned())
            .collect()
    })
    .unwrap()
}

/// The sock_addr attach types berth uses (BPF_CGROUP_INET4_CONNECT … GETPEERNAME6).
/// (`enum bpf_attach_type`: INET4/6_CONNECT 10, 11; UDP4/6_SENDMSG 14, 15; UDP4/6_RECVMSG
/// 19, 20; INET4/6_GETPEERNAME 29, 30.)
pub const CGROUP_ATTACH_TYPES: [u32; 8] = [10, 11, 14, 15, 19, 20, 29, 30];

/// Programs attached to `cgroup` for `attach_type` (BPF_PROG_QUERY).
pub fn cgroup_programs(cgroup: &Path, attach_type: u32) -> u32 {
    #[repr(C)]
    #[derive(Default)]
    struct Query {
        target_fd: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        _rest: [u32; 11],
    }
    const BPF_PROG_QUERY: libc::c_long = 16;
    let dir = std::fs::File::open(cgroup).unwrap();
    let mut q = Query {
        target_fd: dir.as_raw_fd() as u32,
        attach_type,
        ..Query::default()
    };
    // SAFETY: BPF_PROG_QUERY reads and writes only the attr passed, of the size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            &raw mut q,
            std::mem::size_of::<Query>(),
        )
    };
    assert_eq!(rc, 0, "BPF_PROG_QUERY: {}", std::io::Error::last_os_error());
    q.prog_cnt
}

/// Programs on `cgroup`, over every attach type berth uses.
pub fn all_cgroup_programs(cgroup: &Path) -> u32 {
    CGROUP_ATTACH_TYPES
        .iter()
        .map(|t| cgroup_programs(cgroup, *t))
        .sum()
}

/// Entries in kernel mode's conntrack maps (every berth's: a test binary runs alone).
pub fn conntrack_entries() -> usize {
    use berth_common::dnat::{Flow, FlowKey};
    type Raw = aya::maps::HashMap<
        aya::maps::MapData,
        [u8; std::mem::size_of::<FlowKey>()],
        [u8; std::mem::size_of::<Flow>()],
    >;
    aya::maps::loaded_maps()
        .filter_map(Result::ok)
        .filter(|m| m.name_as_str() == Some("BERTH_DNAT_CT"))
        .map(|m| {
            let data = aya::maps::MapData::from_id(m.id()).unwrap();
            let map = Raw::try_from(aya::maps::Map::LruHashMap(data)).unwrap();
            map.keys().count()
        })
        .sum()
}
