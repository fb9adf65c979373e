//! What a reload does to the configuration file's mappings, decided without I/O: which run on
//! untouched, which start, which are replaced (on their predecessor's very socket) and which
//! are retired.
use crate::mapping::Spec;

/// A file mapping that runs now, as the plan sees it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Current<'a> {
    pub(crate) spec: &'a Spec,
    /// Kernel mode was asked for and could not map the port: a reload tries again.
    pub(crate) degraded: bool,
}

/// The difference between what runs and what the file wants.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Plan<'w> {
    /// Runs as the file says: untouched.
    pub(crate) keep: Vec<String>,
    /// New names.
    pub(crate) start: Vec<&'w Spec>,
    /// Changed, or running without the kernel mode it asks for: the new one starts (on the
    /// old one's socket where the address is the same), then the old one drains.
    pub(crate) replace: Vec<&'w Spec>,
    /// Gone from the file: stop accepting and drain.
    pub(crate) retire: Vec<String>,
}

impl Plan<'_> {
    /// Everything that starts, new and replacements, in the file's order.
    pub(crate) fn starting(&self) -> Vec<&Spec> {
        self.start.iter().chain(&self.replace).copied().collect()
    }

    /// `"2 unchanged, 1 added, 1 changed, 0 removed"`.
    pub(crate) fn summary(&self) -> String {
        format!(
            "{} unchanged, {} added, {} changed, {} removed",
            self.keep.len(),
            self.start.len(),
            self.replace.len(),
            self.retire.len()
        )
    }
}

/// Compares the running file mappings with `wanted` (a validated file: names are unique).
pub(crate) fn plan<'a, 'w>(
    current: impl IntoIterator<Item = Current<'a>>,
    wanted: &'w [Spec],
) -> Plan<'w> {
    let current: Vec<Current<'a>> = current.into_iter().collect();
    let running = |name: &str| current.iter().find(|c| c.spec.name == name);
    let mut out = Plan::default();
    for w in wanted {
        match running(&w.name) {
            Some(c) if c.spec == w && !c.degraded => out.keep.push(w.name.clone()),
            Some(_) => out.replace.push(w),
            None => out.start.push(w),
        }
    }
    out.retire = current
        .iter()
        .filter(|c| !wanted.iter().any(|w| w.name == c.spec.name))
        .map(|c| c.spec.name.clone())
        .collect();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::{Defaults, Draft};

    fn spec(name: &str, listen: &str, mode: Option<&str>) -> Spec {
        let mut d = Draft::new(
            crate::addr::Proto::Tcp,
            listen.parse().unwrap(),
            "10.0.0.1:80".parse().unwrap(),
        );
        d.name = Some(name.into());
        d.mode = mode.map(str::to_owned);
        d.resolve(&Defaults::default()).unwrap()
    }

    fn names(v: &[&Spec]) -> Vec<String> {
        v.iter().map(|s| s.name.clone()).collect()
    }

    #[test]
    fn every_kind_of_change() {
        let a = spec("a", "0.0.0.0:1", None);
        let b = spec("b", "0.0.0.0:2", None);
        let c = spec("c", "0.0.0.0:3", None);
        let running = [&a, &b, &c].map(|spec| Current {
            spec,
            degraded: false,
        });
        let wanted = [
            a.clone(),                            // unchanged
            spec("b", "0.0.0.0:2", Some("copy")), // changed
            spec("d", "0.0.0.0:4", None),         // new; c is gone
        ];
        let p = plan(running, &wanted);
        assert_eq!(p.keep, ["a"]);
        assert_eq!(names(&p.replace), ["b"]);
        assert_eq!(names(&p.start), ["d"]);
        assert_eq!(p.retire, ["c"]);
        assert_eq!(names(&p.starting()), ["d", "b"]);
        assert_eq!(p.summary(), "1 unchanged, 1 added, 1 changed, 1 removed");
    }

    #[test]
    fn a_degraded_kernel_mapping_is_retried_and_nothing_else_moves() {
        let k = spec("k", "0.0.0.0:1", Some("dnat"));
        let r = spec("r", "0.0.0.0:2", None);
        let running = [
            Current {
                spec: &k,
                degraded: true,
            },
            Current {
                spec: &r,
                degraded: false,
            },
        ];
        let wanted = [k.clone(), r.clone()];
        let p = plan(running, &wanted);
        assert_eq!(names(&p.replace), ["k"]);
        assert_eq!(p.keep, ["r"]);
        assert!(p.start.is_empty() && p.retire.is_empty());
    }

    #[test]
    fn from_nothing_and_to_nothing() {
        let a = spec("a", "0.0.0.0:1", None);
        let wanted = [a.clone()];
        let p = plan([], &wanted);
        assert_eq!(names(&p.start), ["a"]);
        let p = plan(
            [Current {
                spec: &a,
                degraded: false,
            }],
            &[],
        );
        assert_eq!(p.retire, ["a"]);
        assert_eq!(p.summary(), "0 unchanged, 0 added, 0 changed, 1 removed");
    }

    #[test]
    fn a_renamed_mapping_is_a_new_one_and_a_removed_one() {
        let old = spec("old", "0.0.0.0:1", None);
        let wanted = [spec("new", "0.0.0.0:1", None)];
        let p = plan(
            [Current {
                spec: &old,
                degraded: false,
            }],
            &wanted,
        );
        assert_eq!(
            (names(&p.start), p.retire),
            (vec!["new".into()], vec!["old".into()])
        );
    }
}
