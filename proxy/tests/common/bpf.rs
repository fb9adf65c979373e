//! What kernel mode left in the kernel, for the tests that check it: programs on a TC hook or
//! a cgroup, and entries in the conntrack maps.
use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
};

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

/// The cgroup attach types berth uses (BPF_CGROUP_INET4_CONNECT … GETPEERNAME6, and
/// INET_SOCK_RELEASE). (`enum bpf_attach_type`: INET4/6_CONNECT 10, 11; UDP4/6_SENDMSG 14,
/// 15; UDP4/6_RECVMSG 19, 20; INET4/6_GETPEERNAME 29, 30; INET_SOCK_RELEASE 34.)
pub const CGROUP_ATTACH_TYPES: [u32; 9] = [10, 11, 14, 15, 19, 20, 29, 30, 34];

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
    map_entries("BERTH_DNAT_CT")
}

/// Entries in every loaded map named `name` (the kernel keeps 15 characters of a name),
/// counted with BPF_MAP_GET_NEXT_KEY whatever the map's type and key.
pub fn map_entries(name: &str) -> usize {
    entries(name, |_| true)
}

/// Entries in process `pid`'s maps named `name` (its map descriptors, from
/// /proc/PID/fdinfo), so that other berths of parallel tests do not count.
pub fn map_entries_of(pid: u32, name: &str) -> usize {
    let ids: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("map_id:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .collect();
    entries(name, |id| ids.contains(&id))
}

fn entries(name: &str, pick: impl Fn(u32) -> bool) -> usize {
    aya::maps::loaded_maps()
        .filter_map(Result::ok)
        .filter(|m| m.name_as_str() == Some(name) && pick(m.id()))
        .map(|m| {
            // A map that went away since the listing has no entries.
            let Ok(data) = aya::maps::MapData::from_id(m.id()) else {
                return 0;
            };
            count_keys(data.fd().as_fd().as_raw_fd(), m.key_size() as usize)
        })
        .sum()
}

fn count_keys(fd: std::os::fd::RawFd, key_size: usize) -> usize {
    #[repr(C)]
    struct NextKey {
        map_fd: u32,
        _pad: u32,
        key: u64,
        next_key: u64,
    }
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    let mut key = vec![0u8; key_size];
    let mut next = vec![0u8; key_size];
    let mut first = true;
    let mut n = 0;
    loop {
        let mut attr = NextKey {
            map_fd: fd as u32,
            _pad: 0,
            // A null key asks for the first one.
            key: if first { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
        };
        // SAFETY: the kernel reads `key_size` bytes at `key` and writes as many at `next_key`,
        // both buffers of that size, alive for the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_GET_NEXT_KEY,
                &raw mut attr,
                std::mem::size_of::<NextKey>(),
            )
        };
        if rc != 0 || n > 100_000_000 {
            return n;
        }
        n += 1;
        first = false;
        std::mem::swap(&mut key, &mut next);
    }
}

/// A bpf filesystem of the test's own, mounted on a scratch directory (each bpffs mount is a
/// new instance): what berth pins there is the test's alone and goes with the unmount.
pub struct BpfFs(pub std::path::PathBuf);

impl BpfFs {
    pub fn mount() -> Self {
        let dir = std::env::temp_dir().join(format!("berth-bpffs-{}", super::unique("bf")));
        std::fs::create_dir_all(&dir).unwrap();
        nix::mount::mount(
            Some("bpf"),
            &dir,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        Self(dir)
    }

    /// What is pinned under `sub`, by name (empty if `sub` does not exist).
    pub fn pinned(&self, sub: &str) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.0.join(sub))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&self.0);
    }
}
