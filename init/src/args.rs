//! joey-init's command line. Parsed by hand: init is in every guest image, and a
//! parser library would be most of its size.

use std::path::PathBuf;

use joey_protocols::contract::{AGENT_DEFAULT_ADDR, RUNTIME_DIR};

pub const USAGE: &str = "\
joey-init: PID 1 of a joey sandbox

Usage: joey-init [--sandbox vm|ns] [--agent PATH] [--agent-addr ADDR] [--agent-listen-fd N]
                 [--guest-dir DIR] [--images-dir DIR]

  --sandbox vm|ns     where init runs: PID 1 of a microVM (default) or of host namespaces
  --agent PATH        the agent binary (default /usr/bin/joey-agent; in a VM,
                      JOEY_AGENT_PATH=... on the kernel command line sets it)
  --agent-addr ADDR   the agent's address (default vsock://-1:1024)
  --agent-listen-fd N a listening socket (inherited) the agent serves on, kept by
                      init for every agent it starts
  --guest-dir DIR     a private tmpfs for the agent's state (default /run/joey)
  --images-dir DIR    ns: the host's images directory, kept a slave of the host's
                      (default /run/joey/images)
  --help, --version
";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    pub sandbox: String,
    pub agent: PathBuf,
    pub agent_addr: String,
    /// An inherited listening socket for the agent, instead of binding `agent_addr`.
    pub agent_listen_fd: Option<i32>,
    pub guest_dir: PathBuf,
    /// In a namespace sandbox: the host's images directory, whose mounts keep reaching
    /// the sandbox.
    pub images_dir: PathBuf,
}

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    Run(Args),
    Help,
    Version,
}

impl Args {
    /// The defaults, with `agent_env` (JOEY_AGENT_PATH) as the agent if set.
    pub fn defaults(agent_env: Option<String>) -> Self {
        Args {
            sandbox: "vm".into(),
            agent: agent_env
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "/usr/bin/joey-agent".into())
                .into(),
            agent_addr: AGENT_DEFAULT_ADDR.into(),
            agent_listen_fd: None,
            guest_dir: RUNTIME_DIR.into(),
            images_dir: joey_protocols::contract::images_dir(),
        }
    }
}

/// Parses the arguments after the program name; `--opt VALUE` and `--opt=VALUE` both work.
pub fn parse<I: IntoIterator<Item = String>>(
    argv: I,
    agent_env: Option<String>,
) -> Result<Parsed, String> {
    let mut args = Args::defaults(agent_env);
    let mut it = argv.into_iter();
    while let Some(a) = it.next() {
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match name.as_str() {
            "--sandbox" => args.sandbox = value()?,
            "--agent" => args.agent = value()?.into(),
            "--agent-addr" => args.agent_addr = value()?,
            "--agent-listen-fd" => {
                let v = value()?;
                args.agent_listen_fd =
                    Some(v.parse().ok().filter(|fd| *fd > 2).ok_or_else(|| {
                        format!("--agent-listen-fd {v:?}: not a descriptor above 2")
                    })?)
            }
            "--guest-dir" => args.guest_dir = value()?.into(),
            "--images-dir" => args.images_dir = value()?.into(),
            "-h" | "--help" => return Ok(Parsed::Help),
            "-V" | "--version" => return Ok(Parsed::Version),
            _ => return Err(format!("unexpected argument {a:?}")),
        }
    }
    Ok(Parsed::Run(args))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(a: &[&str], env: Option<&str>) -> Result<Parsed, String> {
        parse(a.iter().map(|s| s.to_string()), env.map(str::to_string))
    }

    #[test]
    fn defaults_and_the_agent_from_the_environment() {
        let Ok(Parsed::Run(a)) = p(&[], None) else {
            panic!()
        };
        assert_eq!(a, Args::defaults(None));
        assert_eq!(a.agent, PathBuf::from("/usr/bin/joey-agent"));
        let Ok(Parsed::Run(a)) = p(&[], Some("/x/agent")) else {
            panic!()
        };
        assert_eq!(a.agent, PathBuf::from("/x/agent"));
    }

    #[test]
    fn both_value_forms_and_the_flag_wins_over_the_environment() {
        let Ok(Parsed::Run(a)) = p(
            &[
                "--sandbox",
                "ns",
                "--agent=/a",
                "--agent-addr",
                "unix:///s",
                "--agent-listen-fd=3",
                "--guest-dir=/g",
                "--images-dir",
                "/i",
            ],
            Some("/env"),
        ) else {
            panic!()
        };
        assert_eq!(
            a,
            Args {
                sandbox: "ns".into(),
                agent: "/a".into(),
                agent_addr: "unix:///s".into(),
                agent_listen_fd: Some(3),
                guest_dir: "/g".into(),
                images_dir: "/i".into(),
            }
        );
    }

    #[test]
    fn bad_input_is_named() {
        assert_eq!(p(&["--agent"], None), Err("--agent needs a value".into()));
        assert!(p(&["--agent-listen-fd", "1"], None).is_err());
        assert!(p(&["--agent-listen-fd", "x"], None).is_err());
        assert_eq!(
            p(&["quiet"], None),
            Err("unexpected argument \"quiet\"".into())
        );
        assert_eq!(p(&["--help"], None), Ok(Parsed::Help));
        assert_eq!(p(&["--version"], None), Ok(Parsed::Version));
    }
}
