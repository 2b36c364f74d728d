//! A fake operating system for unit tests: a container runtime and processes that
//! live in a table. Processes "run" until the test ends them or a signal kills them;
//! their exits reach the agent through the real [`Reaper`], their stdio are real
//! pipes (and ptys) whose container ends the test holds.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::Signal;

use crate::launcher::StdioFds;
use crate::mount::RecordingMounter;
use crate::os::{Namespaces, Os, ProcessId, Syscalls};
use crate::reaper::{Exit, Reaper};
use crate::runtime::Runtime;

struct Alive {
    start_time: u64,
    cgroup: Option<String>,
}

struct FakeContainer {
    init: i32,
    cgroup: String,
}

#[derive(Default)]
struct State {
    next_pid: i32,
    containers: BTreeMap<String, FakeContainer>,
    alive: HashMap<i32, Alive>,
    /// The container's ends of each process's stdio pipes.
    stdio: HashMap<i32, [OwnedFd; 3]>,
    /// The slave side of each process's terminal.
    ttys: HashMap<i32, OwnedFd>,
    caught: HashMap<i32, u64>,
    /// Pids that ignore every signal (a process stuck in the kernel).
    unkillable: Vec<i32>,
    fail_create: Option<String>,
    calls: Vec<String>,
    namespaces: Namespaces,
}

pub struct FakeOs {
    reaper: Arc<Reaper>,
    state: Mutex<State>,
    gone: tokio::sync::Notify,
}

impl FakeOs {
    pub fn new() -> Arc<Self> {
        Arc::new(FakeOs {
            reaper: Arc::new(Reaper::default()),
            state: Mutex::new(State {
                next_pid: 1000,
                namespaces: Namespaces { mnt: 1, pid: 2 },
                ..Default::default()
            }),
            gone: tokio::sync::Notify::new(),
        })
    }

    /// The seams for an agent: this runtime and these processes, and `mounter`.
    pub fn os(self: &Arc<Self>, mounter: Arc<RecordingMounter>) -> Os {
        Os {
            runtime: self.clone(),
            sys: self.clone(),
            mounter,
            reaper: self.reaper.clone(),
        }
    }

    fn st(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    fn spawn(&self, cgroup: Option<String>) -> i32 {
        let mut st = self.st();
        st.next_pid += 1;
        let pid = st.next_pid;
        st.alive.insert(
            pid,
            Alive {
                start_time: 5000 + pid as u64,
                cgroup,
            },
        );
        pid
    }

    /// Ends `pid` as `exit`: its stdio closes and the agent's reaper hears of it.
    fn die(&self, pid: i32, exit: Exit) {
        {
            let mut st = self.st();
            if st.alive.remove(&pid).is_none() {
                return;
            }
            st.stdio.remove(&pid);
            st.ttys.remove(&pid);
        }
        self.reaper.record(pid, exit);
        self.gone.notify_waiters();
    }

    /// The process exits by itself with `code`.
    pub fn exit(&self, pid: i32, code: i32) {
        self.die(pid, Exit::Code(code));
    }

    pub fn is_alive(&self, pid: i32) -> bool {
        self.st().alive.contains_key(&pid)
    }

    /// Takes the container's ends of `pid`'s stdio (stdin to read, stdout and stderr
    /// to write).
    pub fn take_stdio(&self, pid: i32) -> [OwnedFd; 3] {
        self.st().stdio.remove(&pid).expect("the process has pipes")
    }

    /// The init pid of container `id`.
    pub fn init_of(&self, id: &str) -> i32 {
        self.st().containers[id].init
    }

    pub fn calls(&self) -> Vec<String> {
        self.st().calls.clone()
    }

    pub fn fail_create(&self, id: &str) {
        self.st().fail_create = Some(id.into());
    }

    pub fn catch(&self, pid: i32, sig: i32) {
        *self.st().caught.entry(pid).or_default() |= 1 << (sig - 1);
    }

    pub fn make_unkillable(&self, pid: i32) {
        self.st().unkillable.push(pid);
    }

    pub fn set_namespaces(&self, ns: Namespaces) {
        self.st().namespaces = ns;
    }

    /// Runtime state of a container left by a previous agent, its init running in
    /// `cgroup`. Returns the init's pid.
    pub fn leave_container(&self, id: &str, cgroup: &str) -> i32 {
        let pid = self.spawn(Some(cgroup.into()));
        self.st().containers.insert(
            id.into(),
            FakeContainer {
                init: pid,
                cgroup: cgroup.into(),
            },
        );
        pid
    }

    fn record(&self, call: String) {
        self.st().calls.push(call);
    }
}

/// The cgroup path the agent wrote into the bundle's config.json.
fn cgroup_of(bundle: &Path) -> String {
    let spec = oci_spec::runtime::Spec::load(bundle.join("config.json")).expect("config.json");
    spec.linux()
        .as_ref()
        .and_then(|l| l.cgroups_path().clone())
        .expect("a cgroup path")
        .display()
        .to_string()
}

/// Opens a pty and sends its master to the console socket, as a runtime does.
fn send_terminal(console: &Path) -> OwnedFd {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let pty = nix::pty::openpty(None, None).expect("openpty");
    let stream = std::os::unix::net::UnixStream::connect(console).expect("console socket");
    let fds = [pty.master.as_raw_fd()];
    sendmsg::<()>(
        stream.as_raw_fd(),
        &[std::io::IoSlice::new(b"pty")],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .expect("send the terminal");
    pty.slave
}

#[async_trait]
impl Runtime for FakeOs {
    async fn create(
        &self,
        id: &str,
        bundle: &Path,
        console_socket: Option<PathBuf>,
        stdio: StdioFds,
    ) -> anyhow::Result<i32> {
        self.record(format!("create {id}"));
        if self.st().fail_create.as_deref() == Some(id) {
            anyhow::bail!("create container {id}: the fake runtime was told to fail");
        }
        let cgroup = cgroup_of(bundle);
        let pid = self.spawn(Some(cgroup.clone()));
        self.st()
            .containers
            .insert(id.into(), FakeContainer { init: pid, cgroup });
        self.attach(pid, console_socket, stdio);
        Ok(pid)
    }

    async fn exec(
        &self,
        id: &str,
        process: &Path,
        console_socket: Option<PathBuf>,
        stdio: StdioFds,
    ) -> anyhow::Result<i32> {
        self.record(format!("exec {id}"));
        anyhow::ensure!(process.exists(), "no process file {}", process.display());
        let cgroup = self
            .st()
            .containers
            .get(id)
            .map(|c| c.cgroup.clone())
            .ok_or_else(|| anyhow::anyhow!("exec in container {id}: no such container"))?;
        let pid = self.spawn(Some(cgroup));
        self.attach(pid, console_socket, stdio);
        Ok(pid)
    }

    async fn start(&self, id: &str) -> anyhow::Result<()> {
        self.record(format!("start {id}"));
        Ok(())
    }

    async fn kill_all(&self, id: &str, sig: i32) -> anyhow::Result<()> {
        self.record(format!("kill_all {id} {sig}"));
        let pids: Vec<i32> = {
            let st = self.st();
            let cg = st
                .containers
                .get(id)
                .map(|c| c.cgroup.clone())
                .ok_or_else(|| anyhow::anyhow!("kill container {id}: no state"))?;
            st.alive
                .iter()
                .filter(|(_, a)| a.cgroup.as_deref() == Some(cg.as_str()))
                .map(|(p, _)| *p)
                .collect()
        };
        for pid in pids {
            let _ = Syscalls::kill(self, pid, Signal::try_from(sig)?);
        }
        Ok(())
    }

    async fn delete(&self, id: &str, cgroups_path: Option<&str>) -> anyhow::Result<()> {
        self.record(format!("delete {id} {}", cgroups_path.unwrap_or("-")));
        self.st().containers.remove(id);
        Ok(())
    }

    async fn init_pid(&self, id: &str) -> anyhow::Result<Option<i32>> {
        Ok(self.st().containers.get(id).map(|c| c.init))
    }

    fn ids(&self) -> Vec<String> {
        self.st().containers.keys().cloned().collect()
    }
}

impl FakeOs {
    fn attach(&self, pid: i32, console_socket: Option<PathBuf>, stdio: StdioFds) {
        if let Some(fds) = stdio {
            self.st().stdio.insert(pid, fds);
        }
        if let Some(console) = console_socket {
            let slave = send_terminal(&console);
            self.st().ttys.insert(pid, slave);
        }
    }
}

#[async_trait]
impl Syscalls for FakeOs {
    fn kill(&self, pid: i32, sig: Signal) -> nix::Result<()> {
        self.record(format!("kill {pid} {}", sig as i32));
        let (alive, caught, unkillable) = {
            let st = self.st();
            let caught = st.caught.get(&pid).copied().unwrap_or(0);
            (
                st.alive.contains_key(&pid),
                caught & (1 << (sig as i32 - 1)) != 0,
                st.unkillable.contains(&pid),
            )
        };
        if alive && !unkillable && (sig == Signal::SIGKILL || !caught) {
            self.die(pid, Exit::Signal(sig as i32));
        }
        Ok(())
    }

    fn caught_signals(&self, pid: i32) -> Option<u64> {
        let st = self.st();
        st.alive
            .contains_key(&pid)
            .then(|| st.caught.get(&pid).copied().unwrap_or(0))
    }

    fn process_id(&self, pid: i32) -> Option<ProcessId> {
        self.st().alive.get(&pid).map(|a| ProcessId {
            pid,
            start_time: a.start_time,
        })
    }

    fn in_cgroup(&self, pid: i32, path: &str) -> bool {
        self.st()
            .alive
            .get(&pid)
            .is_some_and(|a| a.cgroup.as_deref() == Some(path))
    }

    async fn wait_gone(&self, pid: i32, timeout: Duration) -> bool {
        let wait = async {
            loop {
                let gone = self.gone.notified();
                if !self.is_alive(pid) {
                    return;
                }
                gone.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }

    fn spawn_pidns_holder(&self) -> anyhow::Result<ProcessId> {
        self.record("spawn_pidns_holder".into());
        let pid = self.spawn(None);
        Ok(self.process_id(pid).expect("just spawned"))
    }

    fn set_hostname(&self, name: &str) -> nix::Result<()> {
        self.record(format!("sethostname {name}"));
        Ok(())
    }

    fn namespaces(&self) -> Namespaces {
        self.st().namespaces
    }
}
