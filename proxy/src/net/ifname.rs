//! Validated Linux interface names (IFNAMSIZ).
use std::{fmt, str::FromStr};

use super::NetError;

/// The kernel's limit is IFNAMSIZ (16) including the terminating NUL.
const MAX_LEN: usize = 15;

/// A name the kernel accepts for a network interface: 1 to 15 bytes, no '/', ':' or whitespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IfName(String);

impl IfName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A name made of a short prefix and a base name, e.g. `ve-` + `web`.
    pub(crate) fn with_prefix(prefix: &str, base: &str) -> Result<Self, NetError> {
        format!("{prefix}{base}").parse().map_err(|_| NetError::InvalidIfName {
            name: format!("{prefix}{base}"),
            why: "derived interface name is longer than 15 bytes: use a shorter container name (12 bytes at most)",
        })
    }
}

impl FromStr for IfName {
    type Err = NetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why| NetError::InvalidIfName {
            name: s.to_owned(),
            why,
        };
        if s.is_empty() {
            return Err(bad("empty"));
        }
        if s.len() > MAX_LEN {
            return Err(bad("longer than 15 bytes"));
        }
        if s == "." || s == ".." {
            return Err(bad("reserved name"));
        }
        if s.chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
        {
            return Err(bad("contains '/', ':' or whitespace"));
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for IfName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        assert_eq!("berth0".parse::<IfName>().unwrap().as_str(), "berth0");
        assert!("a23456789012345".parse::<IfName>().is_ok());
    }

    #[test]
    fn rejects_bad_names() {
        for bad in ["", "a234567890123456", "a/b", "a b", "x:y", ".."] {
            assert!(bad.parse::<IfName>().is_err(), "{bad:?} accepted");
        }
        let err = IfName::with_prefix("ve-", "abcdefghijklm").unwrap_err();
        assert!(err.to_string().contains("shorter container name"), "{err}");
    }
}
