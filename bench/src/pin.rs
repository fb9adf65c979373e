//! CPU placement for the single-flow jobs: the client, the server and the proxy all on one
//! CPU, so that a path that adds work cannot look faster than direct by spreading its work
//! (softirqs included, which run where their packets are sent) over more CPUs than direct
//! gets. As sockperf's pinned runs do.
use std::{fs, io};

use nix::{sched::CpuSet, unistd::Pid};

/// The CPU the single-flow jobs run on.
pub(crate) const CPU: usize = 0;

/// Every thread of this process and of the process trees `pids` is on [`CPU`] until this is
/// dropped; then every thread of them gets this thread's placement from before again.
pub(crate) struct Pinned {
    pids: Vec<u32>,
    before: CpuSet,
}

impl Pinned {
    pub(crate) fn new(pids: &[u32]) -> io::Result<Self> {
        let before = nix::sched::sched_getaffinity(Pid::from_raw(0))?;
        let mut one = CpuSet::new();
        one.set(CPU)?;
        let pinned = Self {
            pids: pids.to_vec(),
            before,
        };
        pinned.apply(&one)?;
        Ok(pinned)
    }

    /// Sets `set` on every thread of this process and of the trees of `self.pids`.
    fn apply(&self, set: &CpuSet) -> io::Result<()> {
        let mut roots = vec![std::process::id()];
        roots.extend(crate::procstat::tree(&self.pids));
        for pid in roots {
            // Threads come and go (tokio's blocking pool): one that is gone is no matter.
            let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
                continue;
            };
            for task in tasks.flatten() {
                let Ok(tid) = task.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                match nix::sched::sched_setaffinity(Pid::from_raw(tid), set) {
                    Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let before = self.before;
        let _ = self.apply(&before);
    }
}
