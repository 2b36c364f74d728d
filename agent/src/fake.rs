//! A fake operating system for unit tests: a container runtime, a monitor and
//! processes that live in a table. Processes "run" until the test ends them or a
//! signal kills them; their stdio are real pipes (and ptys) whose container ends the
//! test holds, and whose other ends the fake monitor reads and writes.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::Signal;

use crate::monitor::{Entry, ErrorKind, Launch, Monitor, MonitorError, Stream, What};
use crate::mount::RecordingMounter;
use crate::os::{Namespaces, Os, ProcessId, Syscalls};
use crate::runtime::Runtime;
use crate::stdio::TTY_EOF;

/// How a fake process ended: an exit code, or a signal.
#[derive(Debug, Clone, Copy)]
enum Exit {
    Code(i32),
    Signal(i32),
}

/// The fake monitor's side of a process's stdio: its pipes' other ends, or the
/// terminal's master.
struct Held {
    entry: Entry,
    stdin: Option<std::fs::File>,
    stdout: std::fs::File,
    stderr: Option<std::fs::File>,
}

struct Alive {
    start_time: u64,
    cgroup: Option<String>,
}

struct FakeContainer {
    init: i32,
    cgroup: String,
    started: bool,
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
    /// What the fake monitor holds, by (container, exec) id.
    held: HashMap<(String, String), Held>,
    exits: HashMap<i32, i32>,
}

pub struct FakeOs {
    state: Mutex<State>,
    gone: tokio::sync::Notify,
}

impl FakeOs {
    pub fn new() -> Arc<Self> {
        Arc::new(FakeOs {
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
            monitor: self.clone(),
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

    /// Ends `pid` as `exit`: its stdio closes and the monitor hears of it.
    fn die(&self, pid: i32, exit: Exit) {
        {
            let mut st = self.st();
            if st.alive.remove(&pid).is_none() {
                return;
            }
            st.stdio.remove(&pid);
            st.ttys.remove(&pid);
            let status = match exit {
                Exit::Code(c) => c,
                Exit::Signal(s) => 128 + s,
            };
            st.exits.insert(pid, status);
        }
        self.gone.notify_waiters();
    }

    /// The monitor ended and a new one started: it holds nothing.
    pub fn lose_monitor(&self) {
        self.st().held.clear();
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
                started: true,
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

#[async_trait]
impl Runtime for FakeOs {
    async fn start(&self, id: &str) -> anyhow::Result<()> {
        self.record(format!("start {id}"));
        if let Some(c) = self.st().containers.get_mut(id) {
            c.started = true;
        }
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

    async fn started(&self, id: &str) -> anyhow::Result<bool> {
        let st = self.st();
        let c = st
            .containers
            .get(id)
            .ok_or_else(|| anyhow::anyhow!("inspect container {id}: no state"))?;
        Ok(c.started)
    }

    fn ids(&self) -> Vec<String> {
        self.st().containers.keys().cloned().collect()
    }
}

impl FakeOs {
    /// Gives a new process pipes (or a terminal): the test takes the process's ends,
    /// the fake monitor keeps the others.
    fn attach(&self, entry: Entry, console: Option<&Path>) -> anyhow::Result<()> {
        let pid = entry.pid;
        let key = (entry.cid.clone(), entry.eid.clone());
        let held = match console {
            None => {
                let p = crate::stdio::pipes()?;
                let [i, o, e] = p.ours;
                self.st().stdio.insert(pid, p.theirs);
                Held {
                    entry,
                    stdin: Some(i.into()),
                    stdout: o.into(),
                    stderr: Some(e.into()),
                }
            }
            Some(_console) => {
                let pty = nix::pty::openpty(None, None)?;
                let master = pty.master;
                self.st().ttys.insert(pid, pty.slave);
                let stdin = master.try_clone()?;
                Held {
                    entry,
                    stdin: Some(stdin.into()),
                    stdout: master.into(),
                    stderr: None,
                }
            }
        };
        self.st().held.insert(key, held);
        Ok(())
    }

    fn held<T>(
        &self,
        cid: &str,
        eid: &str,
        f: impl FnOnce(&mut Held) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let mut st = self.st();
        let h = st
            .held
            .get_mut(&(cid.to_string(), eid.to_string()))
            .ok_or_else(|| MonitorError {
                kind: ErrorKind::NotFound,
                message: format!("process {eid:?} of container {cid} is not in the monitor"),
            })?;
        f(h)
    }
}

#[async_trait]
impl Monitor for FakeOs {
    async fn launch(&self, l: Launch) -> anyhow::Result<i32> {
        let (pid, init) = match &l.what {
            What::Create { bundle } => {
                self.record(format!("create {}", l.cid));
                if self.st().fail_create.as_deref() == Some(l.cid.as_str()) {
                    return Err(MonitorError {
                        kind: ErrorKind::Invalid,
                        message: format!("create container {}: the fake was told to fail", l.cid),
                    }
                    .into());
                }
                let cgroup = cgroup_of(bundle);
                let pid = self.spawn(Some(cgroup.clone()));
                let c = FakeContainer {
                    init: pid,
                    cgroup,
                    started: false,
                };
                self.st().containers.insert(l.cid.clone(), c);
                (pid, true)
            }
            What::Exec { process } => {
                self.record(format!("exec {}", l.cid));
                anyhow::ensure!(process.exists(), "no process file {}", process.display());
                let cgroup = self
                    .st()
                    .containers
                    .get(&l.cid)
                    .map(|c| c.cgroup.clone())
                    .ok_or_else(|| {
                        anyhow::anyhow!("exec in container {}: no such container", l.cid)
                    })?;
                (self.spawn(Some(cgroup)), false)
            }
        };
        let entry = Entry {
            cid: l.cid.clone(),
            eid: l.eid.clone(),
            pid,
            init,
            terminal: l.console.is_some(),
            exit: None,
        };
        self.attach(entry, l.console.as_deref())?;
        Ok(pid)
    }

    async fn read(
        &self,
        cid: &str,
        eid: &str,
        stream: Stream,
        max: usize,
    ) -> anyhow::Result<Vec<u8>> {
        let mut file = self.held(cid, eid, |h| {
            let f = match stream {
                Stream::Stdout => Some(&h.stdout),
                Stream::Stderr => h.stderr.as_ref(),
            };
            Ok(f.map(|f| f.try_clone()).transpose()?)
        })?;
        let Some(f) = file.as_mut() else {
            return Ok(Vec::new());
        };
        let mut buf = vec![0u8; max.clamp(1, 1 << 16)];
        match f.read(&mut buf) {
            Ok(n) => buf.truncate(n),
            Err(e) if e.raw_os_error() == Some(libc::EIO) => buf.clear(),
            Err(e) => return Err(e.into()),
        }
        Ok(buf)
    }

    async fn write(&self, cid: &str, eid: &str, data: &[u8]) -> anyhow::Result<()> {
        self.held(cid, eid, |h| {
            let f = h.stdin.as_mut().ok_or_else(|| MonitorError {
                kind: ErrorKind::Invalid,
                message: format!("stdin of {cid}/{eid} is closed"),
            })?;
            Ok(f.write_all(data)?)
        })
    }

    async fn close_stdin(&self, cid: &str, eid: &str) -> anyhow::Result<()> {
        self.held(cid, eid, |h| {
            if let (Some(f), true) = (h.stdin.as_mut(), h.entry.terminal) {
                f.write_all(&[TTY_EOF])?;
            }
            h.stdin = None;
            Ok(())
        })
    }

    async fn resize(&self, cid: &str, eid: &str, rows: u16, cols: u16) -> anyhow::Result<()> {
        self.held(cid, eid, |h| {
            if !h.entry.terminal {
                return Err(MonitorError {
                    kind: ErrorKind::Invalid,
                    message: format!("{cid}/{eid} has no terminal"),
                }
                .into());
            }
            let master = OwnedFd::from(h.stdout.try_clone()?);
            Ok(crate::stdio::resize(&master, rows, cols)?)
        })
    }

    async fn wait(&self, cid: &str, eid: &str) -> anyhow::Result<i32> {
        let pid = self.held(cid, eid, |h| Ok(h.entry.pid))?;
        loop {
            let gone = self.gone.notified();
            if let Some(status) = self.st().exits.get(&pid) {
                return Ok(*status);
            }
            gone.await;
        }
    }

    fn forget(&self, cid: &str, eid: Option<&str>) {
        self.record(format!("forget {cid} {}", eid.unwrap_or("*")));
        self.st()
            .held
            .retain(|(c, e), _| c != cid || eid.is_some_and(|x| x != e));
    }

    async fn pid(&self) -> anyhow::Result<i32> {
        anyhow::bail!("the fake monitor is no process")
    }

    async fn list(&self) -> anyhow::Result<Vec<Entry>> {
        let st = self.st();
        Ok(st
            .held
            .values()
            .map(|h| Entry {
                exit: st.exits.get(&h.entry.pid).copied(),
                ..h.entry.clone()
            })
            .collect())
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
