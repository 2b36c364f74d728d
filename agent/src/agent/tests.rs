//! The agent's logic through the fake OS: the container table, teardown, exec,
//! streams, signals, the sandbox and recovery, without root.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use joey_protocols::agent::{
    CreateContainerRequest, CreateSandboxRequest, ExecProcessRequest, RemoveContainerRequest,
    SignalProcessRequest, Storage,
};
use joey_protocols::oci;

use super::{Agent, Stream};
use crate::dirs::Dirs;
use crate::error::AgentError;
use crate::fake::FakeOs;
use crate::mount::{Mounter, RecordingMounter};
use crate::os::Namespaces;

struct Harness {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    dirs: Dirs,
    fake: Arc<FakeOs>,
    mounter: Arc<RecordingMounter>,
    agent: Agent,
    /// A directory standing in for a container's rootfs, with /bin/sh in it.
    rootfs: PathBuf,
}

impl Harness {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let dirs = Dirs::under(&root.join("state"));
        dirs.create().unwrap();
        let rootfs = root.join("rootfs");
        std::fs::create_dir_all(rootfs.join("bin")).unwrap();
        std::fs::write(rootfs.join("bin/sh"), b"").unwrap();
        let fake = FakeOs::new();
        let mounter = Arc::new(RecordingMounter::default());
        let agent = Agent::new(fake.os(mounter.clone()), dirs.clone(), false, false);
        Harness {
            _tmp: tmp,
            root,
            dirs,
            fake,
            mounter,
            agent,
            rootfs,
        }
    }

    /// A new agent over the same state directories and fake OS (the old one was
    /// killed: none of its destructors runs).
    fn restart(&mut self) {
        let new = Agent::new(
            self.fake.os(self.mounter.clone()),
            self.dirs.clone(),
            true,
            false,
        );
        std::mem::forget(std::mem::replace(&mut self.agent, new));
    }

    fn spec(&self, args: &[&str], terminal: bool) -> oci::Spec {
        let mut spec = oci::Spec::new();
        let mut p = oci::Process::new();
        p.Args = args.iter().map(|a| a.to_string()).collect();
        p.Cwd = "/".into();
        p.Terminal = terminal;
        spec.Process = Some(p).into();
        let mut r = oci::Root::new();
        r.Path = self.rootfs.display().to_string();
        spec.Root = Some(r).into();
        spec
    }

    fn ephemeral(&self, name: &str) -> Storage {
        let mut s = Storage::new();
        s.driver = "ephemeral".into();
        s.mount_point = self.root.join("volumes").join(name).display().to_string();
        s
    }

    async fn create(&self, cid: &str, storages: Vec<Storage>) -> crate::error::Result<()> {
        self.create_with(cid, storages, false).await
    }

    async fn create_with(
        &self,
        cid: &str,
        storages: Vec<Storage>,
        terminal: bool,
    ) -> crate::error::Result<()> {
        let mut req = CreateContainerRequest::new();
        req.container_id = cid.into();
        req.exec_id = cid.into();
        req.storages = storages;
        req.OCI = Some(self.spec(&["sh"], terminal)).into();
        self.agent.create_container(req).await
    }

    async fn remove(&self, cid: &str, timeout: u32) -> crate::error::Result<()> {
        let mut req = RemoveContainerRequest::new();
        req.container_id = cid.into();
        req.timeout = timeout;
        self.agent.remove_container(req).await
    }

    async fn exec(&self, cid: &str, eid: &str) -> crate::error::Result<()> {
        let mut req = ExecProcessRequest::new();
        req.container_id = cid.into();
        req.exec_id = eid.into();
        let mut p = oci::Process::new();
        p.Args = vec!["sh".into()];
        req.process = Some(p).into();
        self.agent.exec_process(req).await
    }

    async fn signal(&self, cid: &str, eid: &str, sig: i32) -> crate::error::Result<()> {
        let mut req = SignalProcessRequest::new();
        req.container_id = cid.into();
        req.exec_id = eid.into();
        req.signal = sig as u32;
        self.agent.signal_process(req).await
    }

    /// A sandbox with an `shm` storage, and container `cid` started in it with a
    /// volume `v1`.
    async fn sandbox_with_a_running_container(&self, cid: &str) {
        self.agent
            .create_sandbox(sandbox_sb(vec![self.ephemeral("shm")]))
            .await
            .unwrap();
        self.create(cid, vec![self.ephemeral("v1")]).await.unwrap();
        self.agent.start_container(cid).await.unwrap();
    }

    /// Whether the volume `name` (see [`Harness::ephemeral`]) was unmounted.
    fn unmounted(&self, name: &str) -> bool {
        let target = self.root.join("volumes").join(name);
        self.mounter.umounts.lock().unwrap().contains(&target)
    }

    fn calls_with(&self, needle: &str) -> Vec<String> {
        self.fake
            .calls()
            .into_iter()
            .filter(|c| c.contains(needle))
            .collect()
    }
}

/// CreateSandbox of sandbox "sb" with a PID namespace holder and `storages`.
fn sandbox_sb(storages: Vec<Storage>) -> CreateSandboxRequest {
    let mut req = CreateSandboxRequest::new();
    req.sandbox_id = "sb".into();
    req.sandbox_pidns = true;
    req.storages = storages;
    req
}

fn is<T: std::fmt::Debug>(r: crate::error::Result<T>, want: fn(&AgentError) -> bool) -> String {
    match r {
        Err(e) if want(&e) => e.to_string(),
        other => panic!("unexpected result {other:?}"),
    }
}

#[tokio::test]
async fn the_table_refuses_duplicates_and_names_unknown_ids() {
    let h = Harness::new();
    h.create("c1", vec![]).await.unwrap();
    let msg = is(h.create("c1", vec![]).await, |e| {
        matches!(e, AgentError::AlreadyExists(_))
    });
    assert!(msg.contains("c1"), "{msg}");
    let msg = is(h.agent.start_container("nope").await, |e| {
        matches!(e, AgentError::NotFound(_))
    });
    assert!(msg.contains("nope"), "{msg}");
    is(h.agent.start_container("../x").await, |e| {
        matches!(e, AgentError::InvalidArgument(_))
    });
    h.agent.start_container("c1").await.unwrap();
    is(h.agent.start_container("c1").await, |e| {
        matches!(e, AgentError::FailedPrecondition(_))
    });
}

#[tokio::test]
async fn a_failed_create_releases_everything_and_frees_the_id() {
    let h = Harness::new();
    h.fake.fail_create("c1");
    let vol = h.ephemeral("v1");
    let msg = is(h.create("c1", vec![vol.clone()]).await, |e| {
        matches!(e, AgentError::InvalidArgument(_))
    });
    assert!(msg.contains("told to fail"), "{msg}");
    // The storage it mounted is unmounted, the runtime asked to delete, the bundle gone.
    let mounted: Vec<_> = h.mounter.mounts.lock().unwrap().clone();
    assert_eq!(mounted.len(), 1);
    assert!(!h.mounter.is_mounted(&mounted[0].target));
    assert_eq!(h.calls_with("delete c1"), ["delete c1 /joey/sandbox/c1"]);
    assert!(!h.dirs.bundles.join("c1").exists());
    // A missing executable is refused before anything is launched, and rolled back too.
    let mut req = CreateContainerRequest::new();
    req.container_id = "c2".into();
    req.OCI = Some(h.spec(&["no-such-binary"], false)).into();
    let msg = is(h.agent.create_container(req).await, |e| {
        matches!(e, AgentError::InvalidArgument(_))
    });
    assert!(msg.contains("no-such-binary"), "{msg}");
    assert!(!h.dirs.bundles.join("c2").exists());
    assert!(h.calls_with("create c2").is_empty());
    // The id is free again.
    h.create("c2", vec![]).await.unwrap();
}

#[tokio::test]
async fn removal_kills_waits_and_releases_what_the_container_held() {
    let h = Harness::new();
    h.create("c1", vec![h.ephemeral("v1")]).await.unwrap();
    h.agent.start_container("c1").await.unwrap();
    let init = h.fake.init_of("c1");
    assert!(h.dirs.bundles.join("c1/resources.json").exists());
    h.remove("c1", 5).await.unwrap();
    assert!(!h.fake.is_alive(init));
    assert!(h.calls_with("kill_all c1 9").len() == 1);
    assert_eq!(h.calls_with("delete c1"), ["delete c1 /joey/sandbox/c1"]);
    assert!(h.unmounted("v1"));
    assert!(
        !h.root.join("volumes/v1").exists(),
        "the mount point the driver created is removed"
    );
    assert!(!h.dirs.bundles.join("c1").exists());
    is(h.agent.start_container("c1").await, |e| {
        matches!(e, AgentError::NotFound(_))
    });
}

#[tokio::test]
async fn an_init_that_outlives_the_timeout_keeps_its_container() {
    let h = Harness::new();
    h.create("c1", vec![h.ephemeral("v1")]).await.unwrap();
    h.agent.start_container("c1").await.unwrap();
    let init = h.fake.init_of("c1");
    h.fake.make_unkillable(init);
    let msg = is(h.remove("c1", 1).await, |e| {
        matches!(e, AgentError::DeadlineExceeded(_))
    });
    assert!(msg.contains("still running"), "{msg}");
    // Nothing was released; the container is still there and can be removed later.
    assert!(h.calls_with("delete c1").is_empty());
    assert!(h.mounter.umounts.lock().unwrap().is_empty());
    h.fake.exit(init, 0);
    h.remove("c1", 1).await.unwrap();
    assert_eq!(h.calls_with("delete c1").len(), 1);
}

#[tokio::test]
async fn exec_wait_and_signals_follow_kata() {
    let h = Harness::new();
    h.create("c1", vec![]).await.unwrap();
    let msg = is(h.exec("c1", "e1").await, |e| {
        matches!(e, AgentError::FailedPrecondition(_))
    });
    assert!(msg.contains("not running"), "{msg}");
    h.agent.start_container("c1").await.unwrap();
    h.exec("c1", "e1").await.unwrap();
    is(h.exec("c1", "e1").await, |e| {
        matches!(e, AgentError::AlreadyExists(_))
    });
    is(h.exec("c1", "../e").await, |e| {
        matches!(e, AgentError::InvalidArgument(_))
    });
    let exec_pid = h.calls_with("exec c1").len();
    assert_eq!(exec_pid, 1);
    assert!(
        !h.dirs.bundles.join("c1/exec-e1.json").exists(),
        "the exec's process file is removed once launched"
    );

    // The exec exits by itself: WaitProcess reports its code, then forgets it.
    let (c, p) = h.agent.containers.process("c1", "e1").unwrap();
    assert!(!c.is_init(&p));
    h.fake.exit(p.pid, 3);
    assert_eq!(h.agent.wait_process("c1", "e1").await.unwrap(), 3);
    is(h.agent.wait_process("c1", "e1").await, |e| {
        matches!(e, AgentError::NotFound(_))
    });

    // SIGTERM to an init without a handler becomes SIGKILL; with one it stays SIGTERM.
    let init = h.fake.init_of("c1");
    h.fake.catch(init, libc::SIGTERM);
    h.signal("c1", "", libc::SIGTERM).await.unwrap();
    assert!(h.fake.is_alive(init));
    assert_eq!(
        h.calls_with(&format!("kill {init}")),
        [format!("kill {init} 15")]
    );
    is(h.signal("c1", "", 0).await, |e| {
        matches!(e, AgentError::InvalidArgument(_))
    });
    h.create("c2", vec![]).await.unwrap();
    h.agent.start_container("c2").await.unwrap();
    let init2 = h.fake.init_of("c2");
    h.signal("c2", "", libc::SIGTERM).await.unwrap();
    assert_eq!(h.agent.wait_process("c2", "").await.unwrap(), 128 + 9);
    // SIGKILL with an empty exec id goes to the whole container.
    h.signal("c1", "", libc::SIGKILL).await.unwrap();
    assert_eq!(h.calls_with("kill_all c1 9").len(), 1);
    assert_eq!(h.agent.wait_process("c1", "").await.unwrap(), 137);
    assert!(!h.fake.is_alive(init2));
}

#[tokio::test]
async fn streams_carry_output_input_and_end_of_stream() {
    let h = Harness::new();
    h.create("c1", vec![]).await.unwrap();
    h.agent.start_container("c1").await.unwrap();
    let init = h.fake.init_of("c1");
    let [stdin, stdout, stderr] = h.fake.take_stdio(init);
    std::fs::File::from(stdout).write_all(b"hello").unwrap();
    std::fs::File::from(stderr).write_all(b"oops").unwrap();
    let out = h
        .agent
        .read_stream("c1", "", Stream::Stdout, 3)
        .await
        .unwrap();
    assert_eq!(out, b"hel");
    let out = h
        .agent
        .read_stream("c1", "", Stream::Stdout, 100)
        .await
        .unwrap();
    assert_eq!(out, b"lo");
    // The writers are closed: end of stream is an empty reply, and stays so.
    assert!(h
        .agent
        .read_stream("c1", "", Stream::Stdout, 100)
        .await
        .unwrap()
        .is_empty());
    assert!(h
        .agent
        .read_stream("c1", "", Stream::Stdout, 100)
        .await
        .unwrap()
        .is_empty());
    let err = h
        .agent
        .read_stream("c1", "", Stream::Stderr, 100)
        .await
        .unwrap();
    assert_eq!(err, b"oops");

    assert_eq!(h.agent.write_stdin("c1", "", b"input").await.unwrap(), 5);
    h.agent.close_stdin("c1", "").await.unwrap();
    let mut got = Vec::new();
    std::fs::File::from(stdin).read_to_end(&mut got).unwrap();
    assert_eq!(got, b"input");
    let msg = is(h.agent.write_stdin("c1", "", b"late").await, |e| {
        matches!(e, AgentError::InvalidArgument(_))
    });
    assert!(msg.contains("closed"), "{msg}");
    let msg = is(h.agent.tty_win_resize("c1", "", 24, 80).await, |e| {
        matches!(e, AgentError::InvalidArgument(_))
    });
    assert!(msg.contains("no terminal"), "{msg}");
}

#[tokio::test]
async fn a_terminal_takes_input_and_resizes() {
    let h = Harness::new();
    h.create_with("t1", vec![], true).await.unwrap();
    h.agent.tty_win_resize("t1", "", 30, 100).await.unwrap();
    is(h.agent.tty_win_resize("t1", "", 70000, 100).await, |e| {
        matches!(e, AgentError::InvalidArgument(_))
    });
    h.agent.write_stdin("t1", "", b"x").await.unwrap();
    // A terminal has no stderr of its own.
    let err = h.agent.read_stream("t1", "", Stream::Stderr, 10).await;
    assert!(err.unwrap().is_empty());
}

#[tokio::test]
async fn the_sandbox_is_created_once_and_destroyed_with_its_containers() {
    let h = Harness::new();
    let mut req = sandbox_sb(vec![h.ephemeral("shm")]);
    req.hostname = "joey-sb".into();
    req.dns = vec!["nameserver 10.0.0.1".into()];
    h.agent.create_sandbox(req.clone()).await.unwrap();
    is(h.agent.create_sandbox(req.clone()).await, |e| {
        matches!(e, AgentError::AlreadyExists(_))
    });
    assert_eq!(h.calls_with("sethostname"), ["sethostname joey-sb"]);
    assert_eq!(h.calls_with("spawn_pidns_holder").len(), 1);
    let info = h.agent.sandbox.info();
    let holder = info.pidns_pid.unwrap();
    assert!(h.fake.is_alive(holder));
    assert_eq!(
        std::fs::read_to_string(info.resolv_conf.as_ref().unwrap()).unwrap(),
        "nameserver 10.0.0.1\n"
    );
    // A container in the sandbox gets its cgroup under the sandbox's id.
    h.create("c1", vec![]).await.unwrap();
    h.agent.start_container("c1").await.unwrap();
    let init = h.fake.init_of("c1");

    h.agent.destroy_sandbox().await.unwrap();
    assert!(!h.fake.is_alive(init));
    assert!(!h.fake.is_alive(holder));
    assert_eq!(h.calls_with("delete c1"), ["delete c1 /joey/sb/c1"]);
    assert!(h.unmounted("shm"));
    assert!(!h.dirs.sandbox.join("sandbox.json").exists());
    assert!(!info.resolv_conf.unwrap().exists());
    // A bad hostname is refused and leaves nothing behind.
    let h = Harness::new();
    let mut bad = CreateSandboxRequest::new();
    bad.hostname = "x".repeat(65);
    bad.sandbox_pidns = true;
    is(h.agent.create_sandbox(bad).await, |e| {
        matches!(e, AgentError::InvalidArgument(_))
    });
    assert!(h.calls_with("spawn_pidns_holder").is_empty());
    h.agent
        .create_sandbox(CreateSandboxRequest::new())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_restarted_agent_takes_over_the_containers_the_monitor_holds() {
    let mut h = Harness::new();
    h.sandbox_with_a_running_container("old").await;
    h.exec("old", "e1").await.unwrap();
    h.create("fresh", vec![]).await.unwrap();
    let init = h.fake.init_of("old");
    let exec = h.agent.containers.process("old", "e1").unwrap().1.pid;
    let [stdin, stdout, _stderr] = h.fake.take_stdio(init);
    std::fs::File::from(stdout).write_all(b"before").unwrap();

    h.restart();
    h.agent.recover().await;
    // Nothing was ended or released, and nothing is reported lost.
    assert!(h.fake.is_alive(init) && h.fake.is_alive(exec));
    assert!(h.calls_with("delete").is_empty());
    assert!(!h.unmounted("v1"));
    // Output written while the agent was down, input, exits and removal all work.
    let out = h.agent.read_stream("old", "", Stream::Stdout, 100).await;
    assert_eq!(out.unwrap(), b"before");
    assert_eq!(h.agent.write_stdin("old", "", b"in").await.unwrap(), 2);
    let mut got = [0u8; 2];
    std::fs::File::from(stdin).read_exact(&mut got).unwrap();
    assert_eq!(&got, b"in");
    h.fake.exit(exec, 4);
    assert_eq!(h.agent.wait_process("old", "e1").await.unwrap(), 4);
    // The created container is still to be started, once.
    h.agent.start_container("fresh").await.unwrap();
    is(h.agent.start_container("old").await, |e| {
        matches!(e, AgentError::FailedPrecondition(_))
    });
    h.remove("old", 1).await.unwrap();
    assert!(!h.fake.is_alive(init));
    assert!(h.unmounted("v1"));
    assert_eq!(h.calls_with("forget old *").len(), 1);
}

#[tokio::test]
async fn a_restarted_agent_ends_the_containers_the_monitor_lost() {
    let mut h = Harness::new();
    h.sandbox_with_a_running_container("old").await;
    let init = h.fake.init_of("old");
    let holder = h.agent.sandbox.info().pidns_pid.unwrap();

    h.fake.lose_monitor();
    h.restart();
    h.agent.recover().await;
    // The sandbox is alive: kept.
    assert_eq!(h.agent.sandbox.info().pidns_pid, Some(holder));
    assert!(h.fake.is_alive(holder));
    is(
        h.agent.create_sandbox(CreateSandboxRequest::new()).await,
        |e| matches!(e, AgentError::AlreadyExists(_)),
    );
    // Its container is killed, released and reported as lost.
    assert!(!h.fake.is_alive(init));
    assert!(!h.calls_with(&format!("kill {init} 9")).is_empty());
    assert_eq!(h.calls_with("delete old"), ["delete old /joey/sb/old"]);
    assert!(h.unmounted("v1"));
    assert!(!h.dirs.bundles.join("old").exists());
    let msg = is(h.agent.wait_process("old", "").await, |e| {
        matches!(e, AgentError::NotFound(_))
    });
    assert!(msg.contains("lost") && msg.contains("monitor"), "{msg}");
    // The id can be used again.
    h.create("old", vec![]).await.unwrap();
    h.agent.start_container("old").await.unwrap();
}

#[tokio::test]
async fn the_state_of_a_sandbox_that_ended_is_discarded() {
    let mut h = Harness::new();
    let req = sandbox_sb(vec![]);
    h.agent.create_sandbox(req.clone()).await.unwrap();
    h.create("old", vec![]).await.unwrap();
    // The previous agent's namespaces died with it; the pid its container's state
    // names now belongs to an unrelated process outside the container's cgroup.
    h.fake.set_namespaces(Namespaces { mnt: 77, pid: 78 });
    let stranger = h.fake.leave_container("other", "/elsewhere");
    h.restart();
    h.agent.recover().await;
    assert_eq!(
        h.agent.sandbox.info().id,
        "",
        "the dead sandbox was adopted"
    );
    assert!(!h.dirs.sandbox.join("sandbox.json").exists());
    assert!(
        h.fake.is_alive(stranger),
        "a process outside the cgroup was signalled"
    );
    assert!(!h.dirs.bundles.join("old").exists());
    let msg = is(h.agent.start_container("old").await, |e| {
        matches!(e, AgentError::NotFound(_))
    });
    assert!(msg.contains("sandbox had ended"), "{msg}");
    // The host can start over.
    h.agent.create_sandbox(req).await.unwrap();
    assert_eq!(h.agent.sandbox.info().id, "sb");
}

#[tokio::test]
async fn a_sandbox_whose_pidns_holder_died_is_not_adopted() {
    let mut h = Harness::new();
    h.agent.create_sandbox(sandbox_sb(vec![])).await.unwrap();
    let holder = h.agent.sandbox.info().pidns_pid.unwrap();
    h.fake.exit(holder, 0);
    h.restart();
    h.agent.recover().await;
    assert_eq!(h.agent.sandbox.info().id, "");
    h.agent
        .create_sandbox(CreateSandboxRequest::new())
        .await
        .unwrap();
}
