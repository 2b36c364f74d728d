//! Agent addresses as kata writes them.

use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAddr {
    /// `unix:///path`: a Unix socket (a namespace sandbox, or a standalone agent).
    Unix(PathBuf),
    /// `hvsock:///path:PORT`: the host end of a hybrid vsock (Firecracker-style): a Unix
    /// socket on which `CONNECT PORT\n` opens a stream to the guest's vsock port.
    Hybrid(PathBuf, u32),
    /// `vsock://CID:PORT`: a kernel vsock (hosts with vhost-vsock).
    Vsock(u32, u32),
}

impl AgentAddr {
    /// The directory holding the address's socket file, if it has one.
    pub fn socket_dir(&self) -> Option<&std::path::Path> {
        match self {
            AgentAddr::Unix(p) | AgentAddr::Hybrid(p, _) => p.parent(),
            AgentAddr::Vsock(..) => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AddrError {
    #[error("agent address {0:?}: expected unix:///path, hvsock:///path:PORT or vsock://CID:PORT")]
    Scheme(String),
    #[error("agent address {0:?}: bad number {1:?}")]
    Number(String, String),
}

impl std::str::FromStr for AgentAddr {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let num = |n: &str| {
            n.parse::<u32>()
                .map_err(|_| AddrError::Number(s.into(), n.into()))
        };
        if let Some(p) = s.strip_prefix("unix://") {
            if p.is_empty() {
                return Err(AddrError::Scheme(s.into()));
            }
            return Ok(AgentAddr::Unix(p.into()));
        }
        if let Some(rest) = s.strip_prefix("hvsock://") {
            let (path, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| AddrError::Scheme(s.into()))?;
            if path.is_empty() {
                return Err(AddrError::Scheme(s.into()));
            }
            return Ok(AgentAddr::Hybrid(path.into(), num(port)?));
        }
        if let Some(rest) = s.strip_prefix("vsock://") {
            let (cid, port) = rest
                .split_once(':')
                .ok_or_else(|| AddrError::Scheme(s.into()))?;
            return Ok(AgentAddr::Vsock(num(cid)?, num(port)?));
        }
        Err(AddrError::Scheme(s.into()))
    }
}

impl std::fmt::Display for AgentAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentAddr::Unix(p) => write!(f, "unix://{}", p.display()),
            AgentAddr::Hybrid(p, port) => write!(f, "hvsock://{}:{port}", p.display()),
            AgentAddr::Vsock(cid, port) => write!(f, "vsock://{cid}:{port}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_forms_parse_and_print_back() {
        for s in [
            "unix:///run/a.sock",
            "hvsock:///run/vm.vsock:1024",
            "vsock://3:1024",
        ] {
            let a: AgentAddr = s.parse().unwrap();
            assert_eq!(a.to_string(), s);
        }
        assert_eq!(
            "hvsock:///x:y:1024".parse::<AgentAddr>().unwrap(),
            AgentAddr::Hybrid("/x:y".into(), 1024)
        );
    }

    #[test]
    fn bad_addresses_say_what_is_expected() {
        for s in [
            "",
            "tcp://1.2.3.4:5",
            "unix://",
            "hvsock:///x",
            "vsock://3",
            "vsock://a:1",
        ] {
            assert!(s.parse::<AgentAddr>().is_err(), "{s}");
        }
    }
}
