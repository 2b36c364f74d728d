//! The container table and each container's lifecycle, owned by one type.
//!
//! [`Containers`] creates containers (rolling back a half-built one), starts them,
//! starts processes in them, removes them, and at start-up recovers what a previous
//! agent left. Every way a container ends — removal, sandbox destruction, a failed
//! create, recovery — goes through [`Containers::teardown`]: stop what runs, then
//! release what the container holds ([`Resources`]: runtime state, cgroup, mounts,
//! bundle). What a container holds is saved in its bundle as it is acquired, so a
//! restarted agent can take over (or release) what its predecessor held.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nix::sys::signal::Signal;
use oci_spec::runtime::Spec;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::dirs::Dirs;
use crate::error::{invalid, not_found, AgentError, Result};
use crate::monitor::{Entry, What};
use crate::os::Os;
use crate::process::{self, Process};
use crate::runtime::dir_names;
use crate::storage::{self, MountedStorage, StorageContext, StorageRequest};
use crate::validate::{check_abs_path, check_id};

/// How long recovery waits for a killed container of a previous agent to die.
const RECOVER_KILL_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The file in a bundle that lists what the container holds.
const RESOURCES_FILE: &str = "resources.json";

/// Locks a mutex, also after a panic elsewhere poisoned it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a container holds besides its processes, released when it ends.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Resources {
    /// Its OCI bundle (config.json, exec process files, this list).
    pub bundle: PathBuf,
    /// Its cgroup (the runtime creates it).
    pub cgroups_path: Option<String>,
    /// Its storages, in the order they were mounted.
    pub storages: Vec<MountedStorage>,
}

impl Resources {
    fn save(&self) -> Result<()> {
        let path = self.bundle.join(RESOURCES_FILE);
        let json = serde_json::to_vec(self).map_err(anyhow::Error::from)?;
        std::fs::write(&path, json)
            .map_err(|e| anyhow::anyhow!("write {}: {e}", path.display()))?;
        Ok(())
    }

    /// What a previous agent saved for the bundle at `bundle` (only the bundle itself
    /// if nothing readable was saved).
    fn load(bundle: PathBuf) -> Self {
        let path = bundle.join(RESOURCES_FILE);
        match std::fs::read(&path).map(|j| serde_json::from_slice::<Resources>(&j)) {
            Ok(Ok(r)) => Resources { bundle, ..r },
            Ok(Err(e)) => {
                warn!("ignoring unreadable {}: {e}", path.display());
                Resources {
                    bundle,
                    ..Default::default()
                }
            }
            Err(_) => Resources {
                bundle,
                ..Default::default()
            },
        }
    }
}

pub struct Container {
    pub id: String,
    pub init: Arc<Process>,
    res: Resources,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    started: AtomicBool,
    removing: AtomicBool,
}

impl Container {
    /// An empty exec id, or the init's own exec id, names the init process.
    pub fn process(&self, exec_id: &str) -> Option<Arc<Process>> {
        if exec_id.is_empty() || exec_id == self.init.exec_id {
            return Some(self.init.clone());
        }
        lock(&self.execs).get(exec_id).cloned()
    }

    pub fn is_init(&self, p: &Process) -> bool {
        std::ptr::eq(p, Arc::as_ptr(&self.init))
    }

    /// Drops an exec's record once its exit status was collected; its streams stay
    /// readable through the references the stream RPCs hold.
    pub fn forget_exec(&self, exec_id: &str) {
        lock(&self.execs).remove(exec_id);
    }

    pub fn cgroups_path(&self) -> &str {
        self.res.cgroups_path.as_deref().unwrap_or_default()
    }

    /// The container's OCI spec, as saved in its bundle.
    pub fn spec(&self) -> Result<Spec> {
        let path = self.res.bundle.join("config.json");
        Spec::load(&path)
            .map_err(|e| anyhow::anyhow!("read the spec of container {}: {e}", self.id).into())
    }

    /// Started, and its init has not ended.
    pub fn is_running(&self) -> bool {
        self.started.load(Ordering::SeqCst) && self.init.exit_status().is_none()
    }
}

/// A container to create: the spec (its cgroup path and namespaces already set by
/// the agent) and the storages to mount first.
pub struct NewContainer {
    pub id: String,
    /// The init's exec id (kata sends the container id).
    pub exec_id: String,
    pub spec: Spec,
    pub cgroups_path: String,
    pub storages: Vec<StorageRequest>,
}

/// What runs when a container is torn down.
enum Running<'a> {
    /// Nothing the agent started (a create that failed before its process existed,
    /// or the state of a sandbox that already ended).
    Nothing,
    /// A container of this agent: its init and execs are known.
    Tracked(&'a Container),
    /// A container a previous agent started: its init is found through the runtime's
    /// state, and only signalled if it is still in the container's cgroup.
    Orphan,
}

#[derive(Default)]
struct Table {
    live: HashMap<String, Arc<Container>>,
    /// Ids being created, so a second CreateContainer with the same id is refused
    /// without holding a lock across the (slow) creation.
    creating: HashSet<String>,
    /// Containers a previous agent created and this one had to end: id → reason.
    lost: HashMap<String, String>,
}

pub struct Containers {
    os: Os,
    dirs: Dirs,
    table: Mutex<Table>,
}

impl Containers {
    pub fn new(os: Os, dirs: Dirs) -> Self {
        Containers {
            os,
            dirs,
            table: Mutex::new(Table::default()),
        }
    }

    /// How many containers the table holds.
    pub fn count(&self) -> usize {
        lock(&self.table).live.len()
    }

    pub fn get(&self, id: &str) -> Result<Arc<Container>> {
        check_id("container", id)?;
        let t = lock(&self.table);
        if let Some(c) = t.live.get(id) {
            return Ok(c.clone());
        }
        if let Some(reason) = t.lost.get(id) {
            return Err(not_found(format!("container {id} was lost: {reason}")));
        }
        Err(not_found(format!("container {id} not found")))
    }

    /// The process `exec_id` of container `cid`; an empty exec id means its init.
    pub fn process(&self, cid: &str, exec_id: &str) -> Result<(Arc<Container>, Arc<Process>)> {
        let c = self.get(cid)?;
        let p = c.process(exec_id).ok_or_else(|| -> AgentError {
            not_found(format!("process {exec_id:?} not found in container {cid}"))
        })?;
        Ok((c, p))
    }

    /// Creates a container. It runs to its end even if the caller goes away, so a
    /// half-built container is always either registered or rolled back.
    pub async fn create(self: &Arc<Self>, new: NewContainer) -> Result<()> {
        check_id("container", &new.id)?;
        check_id("exec", &new.exec_id)?;
        {
            let mut t = lock(&self.table);
            if t.live.contains_key(&new.id) || t.creating.contains(&new.id) {
                return Err(AgentError::AlreadyExists(format!(
                    "container {} already exists",
                    new.id
                )));
            }
            t.creating.insert(new.id.clone());
        }
        let this = self.clone();
        tokio::spawn(async move { this.create_or_roll_back(new).await })
            .await
            .map_err(|e| anyhow::anyhow!("create container: the task failed: {e}"))?
    }

    async fn create_or_roll_back(&self, new: NewContainer) -> Result<()> {
        let id = new.id.clone();
        let mut res = Resources {
            bundle: self.dirs.bundles.join(&id),
            ..Default::default()
        };
        let built = self.build(new, &mut res).await;
        if let Err(e) = &built {
            warn!(container = %id, "create failed, rolling back: {e}");
            let _ = self
                .teardown(&id, &res, Running::Nothing, Duration::ZERO)
                .await;
        }
        let mut t = lock(&self.table);
        t.creating.remove(&id);
        let c = built?;
        t.lost.remove(&id);
        info!(container = %id, pid = c.init.pid, "container created");
        t.live.insert(id, c);
        Ok(())
    }

    /// Acquires what the container needs, recording each step in `res` (and in its
    /// bundle) before the next, then launches its init.
    async fn build(&self, new: NewContainer, res: &mut Resources) -> Result<Arc<Container>> {
        let id = &new.id;
        let began = std::time::Instant::now();
        std::fs::create_dir_all(&res.bundle)
            .map_err(|e| anyhow::anyhow!("create bundle {}: {e}", res.bundle.display()))?;
        res.cgroups_path = Some(new.cgroups_path.clone());
        res.save()?;
        for s in new.storages {
            let (mounter, scratch) = (self.os.mounter.clone(), self.dirs.scratch.clone());
            // A driver may wait for a device to appear: off the async runtime.
            let mounted = tokio::task::spawn_blocking(move || {
                let ctx = StorageContext {
                    mounter: mounter.as_ref(),
                    scratch: &scratch,
                };
                storage::add(&ctx, &s)
            })
            .await
            .map_err(|e| anyhow::anyhow!("storage task failed: {e}"))??;
            res.storages.push(mounted);
            res.save()?;
        }
        check_executable(id, &new.spec)?;
        let config = res.bundle.join("config.json");
        new.spec
            .save(&config)
            .map_err(|e| anyhow::anyhow!("write {}: {e}", config.display()))?;
        let terminal = new
            .spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false);
        let console = res.bundle.join(format!("{}.console", new.exec_id));
        let prepared = began.elapsed();
        let init = process::launch(
            &self.os.monitor,
            &self.dirs.containers,
            (id, &new.exec_id),
            What::Create {
                bundle: res.bundle.clone(),
            },
            terminal,
            &console,
        )
        .await?;
        debug!(
            container = %id,
            prepare_us = prepared.as_micros() as u64,
            launch_us = (began.elapsed() - prepared).as_micros() as u64,
            "storages and bundle ready, then launched"
        );
        Ok(Arc::new(Container {
            id: new.id,
            init,
            res: std::mem::take(res),
            execs: Mutex::new(HashMap::new()),
            started: AtomicBool::new(false),
            removing: AtomicBool::new(false),
        }))
    }

    pub async fn start(&self, id: &str) -> Result<()> {
        let c = self.get(id)?;
        if c.started.swap(true, Ordering::SeqCst) {
            return Err(AgentError::FailedPrecondition(format!(
                "container {id} was already started"
            )));
        }
        if let Err(e) = self.os.runtime.start(id).await {
            c.started.store(false, Ordering::SeqCst);
            return Err(e.into());
        }
        info!(container = id, "container started");
        Ok(())
    }

    /// Starts `process` (an OCI process) as exec `eid` in running container `cid`.
    pub async fn exec(
        &self,
        cid: &str,
        eid: &str,
        process: &oci_spec::runtime::Process,
    ) -> Result<i32> {
        check_id("exec", eid)?;
        let c = self.get(cid)?;
        if !c.is_running() {
            return Err(AgentError::FailedPrecondition(format!(
                "container {cid} is not running; cannot exec {eid}"
            )));
        }
        if c.process(eid).is_some() {
            return Err(AgentError::AlreadyExists(format!(
                "exec {eid} already exists in container {cid}"
            )));
        }
        let path = c.res.bundle.join(format!("exec-{eid}.json"));
        let json = serde_json::to_vec(process).map_err(anyhow::Error::from)?;
        std::fs::write(&path, json)
            .map_err(|e| anyhow::anyhow!("write {}: {e}", path.display()))?;
        let launched = process::launch(
            &self.os.monitor,
            &self.dirs.containers,
            (cid, eid),
            What::Exec {
                process: path.clone(),
            },
            process.terminal().unwrap_or(false),
            &c.res.bundle.join(format!("{eid}.console")),
        )
        .await;
        let _ = std::fs::remove_file(&path);
        let p = launched?;
        let pid = p.pid;
        lock(&c.execs).insert(eid.to_string(), p);
        info!(container = %cid, exec = %eid, pid, "exec started");
        Ok(pid)
    }

    /// Kills every process of the container, waits up to `timeout` for its init to
    /// end, and releases what it holds. If the init outlives the wait, the container
    /// stays as it is and the error says so.
    pub async fn remove(&self, id: &str, timeout: Duration) -> Result<()> {
        let c = self.get(id)?;
        if c.removing.swap(true, Ordering::SeqCst) {
            return Err(AgentError::FailedPrecondition(format!(
                "container {id} is being removed"
            )));
        }
        if let Err(e) = self
            .teardown(id, &c.res, Running::Tracked(&c), timeout)
            .await
        {
            c.removing.store(false, Ordering::SeqCst);
            return Err(e);
        }
        lock(&self.table).live.remove(id);
        info!(container = %id, "container removed");
        Ok(())
    }

    /// Removes every container (the sandbox ends); what a container whose init
    /// outlived `timeout` holds is released anyway.
    pub async fn remove_all(&self, timeout: Duration) {
        let all: Vec<_> = lock(&self.table).live.drain().map(|(_, c)| c).collect();
        for c in all {
            if let Err(e) = self
                .teardown(&c.id, &c.res, Running::Tracked(&c), timeout)
                .await
            {
                warn!("destroy sandbox: {e}");
                self.release(&c.id, &c.res, false).await;
            }
        }
    }

    /// Called once at start: a previous agent may have left containers. Those the
    /// monitor still holds are taken over as they are: their processes, stdio and
    /// exits are the monitor's, what they hold is in their bundles. Any other (the
    /// monitor does not know it) cannot be re-attached: it is ended, what it held is
    /// released, and its id is remembered so the host is told it was lost. When the
    /// sandbox itself had ended (`sandbox_alive` false), their processes and mounts
    /// ended with it: only what is left is released, and no pid from the old state is
    /// signalled. Returns the containers taken over.
    pub async fn recover(&self, sandbox_alive: bool) -> Vec<Arc<Container>> {
        let ids: BTreeSet<String> = self
            .os
            .runtime
            .ids()
            .into_iter()
            .chain(dir_names(&self.dirs.bundles))
            .collect();
        // A fresh sandbox has nothing to take over: the monitor is not asked (nor
        // waited for).
        let held = match sandbox_alive && !ids.is_empty() {
            true => self.os.monitor.list().await.unwrap_or_else(|e| {
                warn!("cannot list the monitor's processes: {e:#}");
                Vec::new()
            }),
            false => Vec::new(),
        };
        let mut adopted = Vec::new();
        for id in ids {
            let res = Resources::load(self.dirs.bundles.join(&id));
            let procs: Vec<Entry> = held.iter().filter(|e| e.cid == id).cloned().collect();
            let res = match procs.iter().any(|e| e.init) {
                true => match self.adopt(&id, res, procs).await {
                    Ok(c) => {
                        adopted.push(c);
                        continue;
                    }
                    Err((res, e)) => {
                        warn!(container = %id, "cannot take the container over: {e:#}");
                        res
                    }
                },
                false => res,
            };
            let reason = if sandbox_alive {
                warn!(container = %id, "container of a previous agent the monitor does not hold: killing it and removing it");
                let _ = self
                    .teardown(&id, &res, Running::Orphan, RECOVER_KILL_TIMEOUT)
                    .await;
                "the agent restarted and the monitor no longer held the container's \
                 processes, so the container was killed and removed"
            } else {
                warn!(container = %id, "container of a sandbox that ended: removing what is left of it");
                self.release(&id, &res, true).await;
                "its sandbox had ended before this agent started, so its state was discarded"
            };
            lock(&self.table).lost.insert(id, reason.into());
        }
        // Processes of containers that have no state left (a create that failed).
        let live: HashSet<String> = lock(&self.table).live.keys().cloned().collect();
        for cid in held.iter().map(|e| &e.cid).collect::<BTreeSet<_>>() {
            if !live.contains(cid) {
                self.os.monitor.forget(cid, None);
            }
        }
        adopted
    }

    /// Takes over container `id`, whose processes the monitor holds.
    async fn adopt(
        &self,
        id: &str,
        res: Resources,
        procs: Vec<Entry>,
    ) -> std::result::Result<Arc<Container>, (Resources, anyhow::Error)> {
        let started = match self.os.runtime.started(id).await {
            Ok(s) => s,
            Err(e) => return Err((res, e)),
        };
        let monitor = &self.os.monitor;
        let mut init = None;
        let mut execs = HashMap::new();
        for e in procs {
            match e.init {
                true => init = Some(Process::adopt(e, monitor.clone())),
                false => {
                    execs.insert(e.eid.clone(), Process::adopt(e, monitor.clone()));
                }
            }
        }
        let Some(init) = init else {
            return Err((res, anyhow::anyhow!("the monitor holds no init for {id}")));
        };
        info!(container = %id, pid = init.pid, execs = execs.len(), started, "container taken over from the previous agent");
        let c = Arc::new(Container {
            id: id.to_string(),
            init,
            res,
            execs: Mutex::new(execs),
            started: AtomicBool::new(started),
            removing: AtomicBool::new(false),
        });
        lock(&self.table).live.insert(id.to_string(), c.clone());
        Ok(c)
    }

    /// Ends a container: stops what runs (waiting up to `timeout` for its init), then
    /// releases what it holds. If a tracked init outlives the wait, nothing is
    /// released and the error says so; an orphan that outlives it is logged.
    async fn teardown(
        &self,
        id: &str,
        res: &Resources,
        running: Running<'_>,
        timeout: Duration,
    ) -> Result<()> {
        self.stop(id, res, running, timeout).await?;
        self.release(id, res, false).await;
        Ok(())
    }

    async fn stop(
        &self,
        id: &str,
        res: &Resources,
        running: Running<'_>,
        timeout: Duration,
    ) -> Result<()> {
        let sys = self.os.sys.as_ref();
        match running {
            Running::Nothing => Ok(()),
            Running::Tracked(c) => {
                let execs: Vec<_> = lock(&c.execs).values().cloned().collect();
                for p in &execs {
                    let _ = p.signal(sys, Signal::SIGKILL);
                }
                if c.init.exit_status().is_some() {
                    return Ok(());
                }
                if let Err(e) = self.os.runtime.kill_all(id, libc::SIGKILL).await {
                    warn!("{e:#}; killing the init process alone");
                }
                let _ = c.init.signal(sys, Signal::SIGKILL);
                if tokio::time::timeout(timeout, c.init.wait()).await.is_err() {
                    return Err(AgentError::DeadlineExceeded(format!(
                        "container {id}: init (pid {}) still running {}s after SIGKILL",
                        c.init.pid,
                        timeout.as_secs()
                    )));
                }
                Ok(())
            }
            Running::Orphan => {
                // The saved pid is only trusted while it is in the container's cgroup.
                let pid = self
                    .os
                    .runtime
                    .init_pid(id)
                    .await
                    .ok()
                    .flatten()
                    .filter(|pid| {
                        res.cgroups_path
                            .as_deref()
                            .is_some_and(|cg| sys.in_cgroup(*pid, cg))
                    });
                if let Err(e) = self.os.runtime.kill_all(id, libc::SIGKILL).await {
                    warn!("{e:#}");
                }
                if let Some(pid) = pid {
                    let _ = sys.kill(pid, Signal::SIGKILL);
                    // Its cgroup can only go once it died (init reaps it, not us).
                    if !sys.wait_gone(pid, timeout).await {
                        warn!(container = %id, pid, "still running {}s after SIGKILL", timeout.as_secs());
                    }
                }
                Ok(())
            }
        }
    }

    /// Deletes the runtime state and cgroup, unmounts the storages (with
    /// `mounted_only`, only those still mounted here) and removes the bundle.
    async fn release(&self, id: &str, res: &Resources, mounted_only: bool) {
        // Its processes' stdio and exits, in the monitor.
        self.os.monitor.forget(id, None);
        if let Err(e) = self
            .os
            .runtime
            .delete(id, res.cgroups_path.as_deref())
            .await
        {
            warn!("{e:#}");
        }
        let mounter = self.os.mounter.as_ref();
        for s in res.storages.iter().rev() {
            if !mounted_only || mounter.is_mounted(&s.mount_point) {
                s.remove(mounter);
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&res.bundle) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!("remove bundle {}: {e}", res.bundle.display());
            }
        }
    }
}

/// Refuses a spec whose process binary is missing from the rootfs, with its name.
fn check_executable(cid: &str, spec: &Spec) -> Result<()> {
    let root = spec
        .root()
        .as_ref()
        .ok_or_else(|| invalid(format!("container {cid}: the spec has no root")))?;
    let root = check_abs_path("container root path", &root.path().display().to_string())?;
    if !root.is_dir() {
        return Err(invalid(format!(
            "container {cid}: root {} is not a directory (did its storage mount?)",
            root.display()
        )));
    }
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| invalid(format!("container {cid}: the spec has no process")))?;
    let args = process.args().clone().unwrap_or_default();
    let prog = args
        .first()
        .filter(|a| !a.is_empty())
        .ok_or_else(|| invalid(format!("container {cid}: process.args is empty")))?;
    let exists = |p: &str| {
        root.join(p.trim_start_matches('/'))
            .symlink_metadata()
            .is_ok()
    };
    if prog.contains('/') {
        let cwd = process.cwd().display().to_string();
        let full = if prog.starts_with('/') {
            prog.clone()
        } else {
            format!("{cwd}/{prog}")
        };
        if exists(&full) {
            return Ok(());
        }
        return Err(invalid(format!(
            "container {cid}: executable {prog:?} not found in its rootfs"
        )));
    }
    let path = process
        .env()
        .as_ref()
        .and_then(|env| {
            env.iter()
                .find_map(|e| e.strip_prefix("PATH=").map(str::to_string))
        })
        .unwrap_or_else(|| DEFAULT_PATH.to_string());
    if path.split(':').any(|dir| exists(&format!("{dir}/{prog}"))) {
        return Ok(());
    }
    Err(invalid(format!(
        "container {cid}: executable {prog:?} not found in its rootfs (searched PATH={path})"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_with(root: &std::path::Path, args: &[&str], env: &[&str]) -> Spec {
        let mut s = Spec::default();
        let mut r = s.root().clone().unwrap();
        r.set_path(root.to_path_buf());
        s.set_root(Some(r));
        let mut p = s.process().clone().unwrap();
        p.set_args(Some(args.iter().map(|a| a.to_string()).collect()));
        p.set_env(Some(env.iter().map(|a| a.to_string()).collect()));
        s.set_process(Some(p));
        s
    }

    #[test]
    fn a_missing_executable_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("bin")).unwrap();
        std::fs::write(tmp.path().join("bin/echo"), b"").unwrap();
        check_executable("c", &spec_with(tmp.path(), &["echo"], &["PATH=/bin"])).unwrap();
        check_executable("c", &spec_with(tmp.path(), &["/bin/echo"], &[])).unwrap();
        let err = check_executable("c", &spec_with(tmp.path(), &["nope"], &["PATH=/bin"]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"nope\"") && err.contains("PATH=/bin"),
            "{err}"
        );
        let err = check_executable("c", &spec_with(tmp.path(), &["/bin/nope"], &[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/bin/nope"), "{err}");
    }
}
