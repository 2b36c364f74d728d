//! Conversion of kata's protobuf OCI `Spec` into `oci-spec` types for libcontainer.
//!
//! The protobuf is turned into the OCI runtime-spec JSON shape field by field and then
//! deserialized by `oci-spec`, which validates enumerations (namespace types, rlimit
//! names, capabilities, device types) on the way. proto3 cannot tell an unset number
//! from zero, so numeric limits of zero mean "unset", as kata's own agent reads them.

use joey_protocols::oci;
use oci_spec::runtime::Spec;
use serde_json::{json, Map, Value};

use crate::error::{invalid, Result};

/// Converts the host's spec. Errors name the offending field.
pub fn to_oci(spec: &oci::Spec) -> Result<Spec> {
    let value = spec_value(spec)?;
    serde_json::from_value(value).map_err(|e| invalid(format!("OCI spec: {e}")))
}

/// Converts UpdateContainer's resources. Errors name the offending field.
pub fn resources_to_oci(r: &oci::LinuxResources) -> Result<oci_spec::runtime::LinuxResources> {
    serde_json::from_value(resources_value(r)).map_err(|e| invalid(format!("LinuxResources: {e}")))
}

fn spec_value(s: &oci::Spec) -> Result<Value> {
    let mut v = Map::new();
    let version = if s.Version.is_empty() {
        "1.0.2"
    } else {
        &s.Version
    };
    v.insert("ociVersion".into(), json!(version));
    if let Some(p) = s.Process.as_ref() {
        v.insert("process".into(), process_value(p));
    }
    if let Some(r) = s.Root.as_ref() {
        v.insert(
            "root".into(),
            json!({"path": r.Path, "readonly": r.Readonly}),
        );
    }
    put_str(&mut v, "hostname", &s.Hostname);
    v.insert(
        "mounts".into(),
        Value::Array(
            s.Mounts
                .iter()
                .map(|m| {
                    let mut o = Map::new();
                    o.insert("destination".into(), json!(m.destination));
                    put_str(&mut o, "source", &m.source);
                    put_str(&mut o, "type", &m.type_);
                    put_list(&mut o, "options", &m.options);
                    Value::Object(o)
                })
                .collect(),
        ),
    );
    if let Some(h) = s.Hooks.as_ref() {
        let hooks = |list: &[oci::Hook]| -> Value {
            Value::Array(
                list.iter()
                    .map(|h| {
                        let mut o = Map::new();
                        o.insert("path".into(), json!(h.Path));
                        put_list(&mut o, "args", &h.Args);
                        put_list(&mut o, "env", &h.Env);
                        if h.Timeout > 0 {
                            o.insert("timeout".into(), json!(h.Timeout));
                        }
                        Value::Object(o)
                    })
                    .collect(),
            )
        };
        v.insert(
            "hooks".into(),
            json!({
                "prestart": hooks(&h.Prestart),
                "poststart": hooks(&h.Poststart),
                "poststop": hooks(&h.Poststop),
                "createRuntime": hooks(&h.CreateRuntime),
                "createContainer": hooks(&h.CreateContainer),
                "startContainer": hooks(&h.StartContainer),
            }),
        );
    }
    if !s.Annotations.is_empty() {
        v.insert("annotations".into(), json!(s.Annotations));
    }
    if let Some(l) = s.Linux.as_ref() {
        v.insert("linux".into(), linux_value(l)?);
    }
    Ok(Value::Object(v))
}

/// Converts the process of an ExecProcess request.
pub fn process_to_oci(p: &oci::Process) -> Result<oci_spec::runtime::Process> {
    serde_json::from_value(process_value(p)).map_err(|e| invalid(format!("OCI process: {e}")))
}

fn process_value(p: &oci::Process) -> Value {
    let mut o = Map::new();
    o.insert("terminal".into(), json!(p.Terminal));
    if let Some(b) = p.ConsoleSize.as_ref() {
        o.insert(
            "consoleSize".into(),
            json!({"height": b.Height, "width": b.Width}),
        );
    }
    let u = p.User.as_ref().cloned().unwrap_or_default();
    let mut user = Map::new();
    user.insert("uid".into(), json!(u.UID));
    user.insert("gid".into(), json!(u.GID));
    if !u.AdditionalGids.is_empty() {
        user.insert("additionalGids".into(), json!(u.AdditionalGids));
    }
    put_str(&mut user, "username", &u.Username);
    o.insert("user".into(), Value::Object(user));
    o.insert("args".into(), json!(p.Args));
    put_list(&mut o, "env", &p.Env);
    o.insert(
        "cwd".into(),
        json!(if p.Cwd.is_empty() {
            "/"
        } else {
            p.Cwd.as_str()
        }),
    );
    if let Some(c) = p.Capabilities.as_ref() {
        o.insert(
            "capabilities".into(),
            json!({
                "bounding": c.Bounding,
                "effective": c.Effective,
                "inheritable": c.Inheritable,
                "permitted": c.Permitted,
                "ambient": c.Ambient,
            }),
        );
    }
    if !p.Rlimits.is_empty() {
        o.insert(
            "rlimits".into(),
            Value::Array(
                p.Rlimits
                    .iter()
                    .map(|r| json!({"type": r.Type, "hard": r.Hard, "soft": r.Soft}))
                    .collect(),
            ),
        );
    }
    o.insert("noNewPrivileges".into(), json!(p.NoNewPrivileges));
    put_str(&mut o, "apparmorProfile", &p.ApparmorProfile);
    if p.OOMScoreAdj != 0 {
        o.insert("oomScoreAdj".into(), json!(p.OOMScoreAdj));
    }
    put_str(&mut o, "selinuxLabel", &p.SelinuxLabel);
    Value::Object(o)
}

fn linux_value(l: &oci::Linux) -> Result<Value> {
    let mut o = Map::new();
    let idmap = |m: &[oci::LinuxIDMapping]| -> Value {
        Value::Array(
            m.iter()
                .map(|m| json!({"containerID": m.ContainerID, "hostID": m.HostID, "size": m.Size}))
                .collect(),
        )
    };
    if !l.UIDMappings.is_empty() {
        o.insert("uidMappings".into(), idmap(&l.UIDMappings));
    }
    if !l.GIDMappings.is_empty() {
        o.insert("gidMappings".into(), idmap(&l.GIDMappings));
    }
    if !l.Sysctl.is_empty() {
        o.insert("sysctl".into(), json!(l.Sysctl));
    }
    if let Some(r) = l.Resources.as_ref() {
        o.insert("resources".into(), resources_value(r));
    }
    put_str(&mut o, "cgroupsPath", &l.CgroupsPath);
    o.insert(
        "namespaces".into(),
        Value::Array(
            l.Namespaces
                .iter()
                .map(|n| {
                    let mut ns = Map::new();
                    ns.insert("type".into(), json!(n.Type));
                    put_str(&mut ns, "path", &n.Path);
                    Value::Object(ns)
                })
                .collect(),
        ),
    );
    if !l.Devices.is_empty() {
        o.insert(
            "devices".into(),
            Value::Array(
                l.Devices
                    .iter()
                    .map(|d| {
                        json!({
                            "path": d.Path, "type": d.Type, "major": d.Major, "minor": d.Minor,
                            "fileMode": d.FileMode, "uid": d.UID, "gid": d.GID,
                        })
                    })
                    .collect(),
            ),
        );
    }
    if let Some(sc) = l.Seccomp.as_ref() {
        if !sc.DefaultAction.is_empty() || !sc.Syscalls.is_empty() {
            o.insert("seccomp".into(), seccomp_value(sc));
        }
    }
    put_str(&mut o, "rootfsPropagation", &l.RootfsPropagation);
    put_list(&mut o, "maskedPaths", &l.MaskedPaths);
    put_list(&mut o, "readonlyPaths", &l.ReadonlyPaths);
    put_str(&mut o, "mountLabel", &l.MountLabel);
    if let Some(rdt) = l.IntelRdt.as_ref() {
        if !rdt.L3CacheSchema.is_empty() {
            o.insert(
                "intelRdt".into(),
                json!({"l3CacheSchema": rdt.L3CacheSchema}),
            );
        }
    }
    Ok(Value::Object(o))
}

/// `linux.seccomp`: the default action, architectures, flags and the syscall rules
/// (an errno only where the host set one: unset means the kernel's default, EPERM).
fn seccomp_value(sc: &oci::LinuxSeccomp) -> Value {
    let mut o = Map::new();
    put_str(&mut o, "defaultAction", &sc.DefaultAction);
    put_list(&mut o, "architectures", &sc.Architectures);
    put_list(&mut o, "flags", &sc.Flags);
    let syscalls: Vec<Value> = sc
        .Syscalls
        .iter()
        .map(|s| {
            let mut r = Map::new();
            put_list(&mut r, "names", &s.Names);
            put_str(&mut r, "action", &s.Action);
            if s.has_errnoret() {
                r.insert("errnoRet".into(), json!(s.errnoret()));
            }
            if !s.Args.is_empty() {
                let args: Vec<Value> = s
                    .Args
                    .iter()
                    .map(|a| json!({"index": a.Index, "value": a.Value, "valueTwo": a.ValueTwo, "op": a.Op}))
                    .collect();
                r.insert("args".into(), Value::Array(args));
            }
            Value::Object(r)
        })
        .collect();
    if !syscalls.is_empty() {
        o.insert("syscalls".into(), Value::Array(syscalls));
    }
    Value::Object(o)
}

fn resources_value(r: &oci::LinuxResources) -> Value {
    let mut o = Map::new();
    if !r.Devices.is_empty() {
        o.insert(
            "devices".into(),
            Value::Array(
                r.Devices
                    .iter()
                    .map(|d| {
                        let mut dev = Map::new();
                        dev.insert("allow".into(), json!(d.Allow));
                        put_str(&mut dev, "type", &d.Type);
                        // -1 is the OCI wildcard; kata sends it as is.
                        if d.Major != 0 || d.Type == "c" || d.Type == "b" {
                            dev.insert("major".into(), json!(d.Major));
                            dev.insert("minor".into(), json!(d.Minor));
                        }
                        put_str(&mut dev, "access", &d.Access);
                        Value::Object(dev)
                    })
                    .collect(),
            ),
        );
    }
    if let Some(m) = r.Memory.as_ref() {
        let mut mem = Map::new();
        put_nonzero(&mut mem, "limit", m.Limit);
        put_nonzero(&mut mem, "reservation", m.Reservation);
        put_nonzero(&mut mem, "swap", m.Swap);
        put_nonzero(&mut mem, "kernel", m.Kernel);
        put_nonzero(&mut mem, "kernelTCP", m.KernelTCP);
        if m.Swappiness != 0 {
            mem.insert("swappiness".into(), json!(m.Swappiness));
        }
        if m.DisableOOMKiller {
            mem.insert("disableOOMKiller".into(), json!(true));
        }
        o.insert("memory".into(), Value::Object(mem));
    }
    if let Some(c) = r.CPU.as_ref() {
        let mut cpu = Map::new();
        if c.Shares != 0 {
            cpu.insert("shares".into(), json!(c.Shares));
        }
        put_nonzero(&mut cpu, "quota", c.Quota);
        if c.Period != 0 {
            cpu.insert("period".into(), json!(c.Period));
        }
        put_nonzero(&mut cpu, "realtimeRuntime", c.RealtimeRuntime);
        if c.RealtimePeriod != 0 {
            cpu.insert("realtimePeriod".into(), json!(c.RealtimePeriod));
        }
        put_str(&mut cpu, "cpus", &c.Cpus);
        put_str(&mut cpu, "mems", &c.Mems);
        o.insert("cpu".into(), Value::Object(cpu));
    }
    if let Some(p) = r.Pids.as_ref() {
        if p.Limit != 0 {
            o.insert("pids".into(), json!({"limit": p.Limit}));
        }
    }
    if let Some(b) = r.BlockIO.as_ref() {
        let mut bio = Map::new();
        if b.Weight != 0 {
            bio.insert("weight".into(), json!(b.Weight));
        }
        if b.LeafWeight != 0 {
            bio.insert("leafWeight".into(), json!(b.LeafWeight));
        }
        if !b.WeightDevice.is_empty() {
            bio.insert(
                "weightDevice".into(),
                Value::Array(
                    b.WeightDevice
                        .iter()
                        .map(|d| json!({"major": d.Major, "minor": d.Minor, "weight": d.Weight, "leafWeight": d.LeafWeight}))
                        .collect(),
                ),
            );
        }
        let throttle = |list: &[oci::LinuxThrottleDevice]| -> Value {
            Value::Array(
                list.iter()
                    .map(|d| json!({"major": d.Major, "minor": d.Minor, "rate": d.Rate}))
                    .collect(),
            )
        };
        for (key, list) in [
            ("throttleReadBpsDevice", &b.ThrottleReadBpsDevice),
            ("throttleWriteBpsDevice", &b.ThrottleWriteBpsDevice),
            ("throttleReadIOPSDevice", &b.ThrottleReadIOPSDevice),
            ("throttleWriteIOPSDevice", &b.ThrottleWriteIOPSDevice),
        ] {
            if !list.is_empty() {
                bio.insert(key.into(), throttle(list));
            }
        }
        o.insert("blockIO".into(), Value::Object(bio));
    }
    if !r.HugepageLimits.is_empty() {
        o.insert(
            "hugepageLimits".into(),
            Value::Array(
                r.HugepageLimits
                    .iter()
                    .map(|h| json!({"pageSize": h.Pagesize, "limit": h.Limit}))
                    .collect(),
            ),
        );
    }
    if let Some(n) = r.Network.as_ref() {
        let mut net = Map::new();
        if n.ClassID != 0 {
            net.insert("classID".into(), json!(n.ClassID));
        }
        if !n.Priorities.is_empty() {
            net.insert(
                "priorities".into(),
                Value::Array(
                    n.Priorities
                        .iter()
                        .map(|p| json!({"name": p.Name, "priority": p.Priority}))
                        .collect(),
                ),
            );
        }
        o.insert("network".into(), Value::Object(net));
    }
    Value::Object(o)
}

fn put_str(o: &mut Map<String, Value>, key: &str, s: &str) {
    if !s.is_empty() {
        o.insert(key.into(), json!(s));
    }
}

fn put_list(o: &mut Map<String, Value>, key: &str, l: &[String]) {
    if !l.is_empty() {
        o.insert(key.into(), json!(l));
    }
}

fn put_nonzero(o: &mut Map<String, Value>, key: &str, n: i64) {
    if n != 0 {
        o.insert(key.into(), json!(n));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{LinuxNamespaceType, PosixRlimitType};

    fn sample() -> oci::Spec {
        let mut s = oci::Spec::new();
        let mut p = oci::Process::new();
        p.Args = vec!["/bin/echo".into(), "hi".into()];
        p.Env = vec!["PATH=/bin".into()];
        p.Cwd = "/work".into();
        let mut u = oci::User::new();
        u.UID = 1000;
        u.GID = 100;
        u.AdditionalGids = vec![10];
        p.User = Some(u).into();
        let mut caps = oci::LinuxCapabilities::new();
        caps.Bounding = vec!["CAP_KILL".into()];
        caps.Effective = vec!["CAP_KILL".into()];
        p.Capabilities = Some(caps).into();
        let mut rl = oci::POSIXRlimit::new();
        rl.Type = "RLIMIT_NOFILE".into();
        rl.Hard = 1024;
        rl.Soft = 512;
        p.Rlimits = vec![rl];
        p.NoNewPrivileges = true;
        s.Process = Some(p).into();
        let mut root = oci::Root::new();
        root.Path = "/run/c1/rootfs".into();
        root.Readonly = true;
        s.Root = Some(root).into();
        s.Hostname = "box".into();
        let mut m = oci::Mount::new();
        m.destination = "/proc".into();
        m.source = "proc".into();
        m.type_ = "proc".into();
        s.Mounts = vec![m];
        let mut l = oci::Linux::new();
        l.CgroupsPath = "/joey/c1".into();
        let mut ns = oci::LinuxNamespace::new();
        ns.Type = "pid".into();
        let mut net = oci::LinuxNamespace::new();
        net.Type = "network".into();
        net.Path = "/proc/1/ns/net".into();
        l.Namespaces = vec![ns, net];
        l.MaskedPaths = vec!["/proc/kcore".into()];
        l.ReadonlyPaths = vec!["/proc/sys".into()];
        let mut res = oci::LinuxResources::new();
        let mut mem = oci::LinuxMemory::new();
        mem.Limit = 64 << 20;
        res.Memory = Some(mem).into();
        let mut cpu = oci::LinuxCPU::new();
        cpu.Quota = 50000;
        cpu.Period = 100000;
        res.CPU = Some(cpu).into();
        let mut pids = oci::LinuxPids::new();
        pids.Limit = 32;
        res.Pids = Some(pids).into();
        l.Resources = Some(res).into();
        s.Linux = Some(l).into();
        s
    }

    #[test]
    fn every_field_arrives() {
        let spec = to_oci(&sample()).unwrap();
        let p = spec.process().as_ref().unwrap();
        assert_eq!(p.args().as_ref().unwrap(), &["/bin/echo", "hi"]);
        assert_eq!(p.env().as_ref().unwrap(), &["PATH=/bin"]);
        assert_eq!(p.cwd().to_str(), Some("/work"));
        assert_eq!(p.user().uid(), 1000);
        assert_eq!(p.user().gid(), 100);
        assert_eq!(p.user().additional_gids().as_ref().unwrap(), &[10]);
        assert_eq!(p.no_new_privileges(), Some(true));
        let rl = &p.rlimits().as_ref().unwrap()[0];
        assert_eq!(rl.typ(), PosixRlimitType::RlimitNofile);
        assert_eq!((rl.hard(), rl.soft()), (1024, 512));
        let caps = p.capabilities().as_ref().unwrap();
        assert_eq!(caps.bounding().as_ref().unwrap().len(), 1);
        assert_eq!(spec.root().as_ref().unwrap().readonly(), Some(true));
        assert_eq!(spec.hostname().as_deref(), Some("box"));
        assert_eq!(
            spec.mounts().as_ref().unwrap()[0].typ().as_deref(),
            Some("proc")
        );
        let l = spec.linux().as_ref().unwrap();
        assert_eq!(
            l.cgroups_path().as_ref().unwrap().to_str(),
            Some("/joey/c1")
        );
        let ns = l.namespaces().as_ref().unwrap();
        assert_eq!(ns[0].typ(), LinuxNamespaceType::Pid);
        assert_eq!(ns[1].typ(), LinuxNamespaceType::Network);
        assert_eq!(
            ns[1].path().as_ref().unwrap().to_str(),
            Some("/proc/1/ns/net")
        );
        assert_eq!(l.masked_paths().as_ref().unwrap(), &["/proc/kcore"]);
        assert_eq!(l.readonly_paths().as_ref().unwrap(), &["/proc/sys"]);
        let r = l.resources().as_ref().unwrap();
        assert_eq!(r.memory().as_ref().unwrap().limit(), Some(64 << 20));
        assert_eq!(r.cpu().as_ref().unwrap().quota(), Some(50000));
        assert_eq!(r.cpu().as_ref().unwrap().period(), Some(100000));
        assert_eq!(r.pids().as_ref().unwrap().limit(), 32);
    }

    #[test]
    fn unknown_enumerations_are_refused_with_the_field() {
        let mut s = sample();
        s.Linux.as_mut().unwrap().Namespaces[0].Type = "bogus".into();
        let err = to_oci(&s).unwrap_err().to_string();
        assert!(err.contains("OCI spec"), "{err}");
    }

    #[test]
    fn seccomp_arrives_with_its_rules_errnos_and_arguments() {
        let mut s = sample();
        let mut sc = oci::LinuxSeccomp::new();
        sc.DefaultAction = "SCMP_ACT_ERRNO".into();
        sc.Architectures = vec!["SCMP_ARCH_X86_64".into(), "SCMP_ARCH_X86".into()];
        let mut allow = oci::LinuxSyscall::new();
        allow.Names = vec!["read".into(), "write".into()];
        allow.Action = "SCMP_ACT_ALLOW".into();
        let mut deny = oci::LinuxSyscall::new();
        deny.Names = vec!["mkdirat".into()];
        deny.Action = "SCMP_ACT_ERRNO".into();
        deny.set_errnoret(1);
        let mut arg = oci::LinuxSeccompArg::new();
        arg.Index = 1;
        arg.Value = 0o777;
        arg.Op = "SCMP_CMP_EQ".into();
        deny.Args.push(arg);
        sc.Syscalls = vec![allow, deny];
        s.Linux.as_mut().unwrap().Seccomp = Some(sc).into();
        let spec = to_oci(&s).unwrap();
        let sec = spec.linux().as_ref().unwrap().seccomp().as_ref().unwrap();
        assert_eq!(
            sec.default_action(),
            oci_spec::runtime::LinuxSeccompAction::ScmpActErrno
        );
        assert_eq!(sec.architectures().as_ref().unwrap().len(), 2);
        let rules = sec.syscalls().as_ref().unwrap();
        assert_eq!(rules[0].names(), &["read".to_string(), "write".to_string()]);
        assert_eq!(rules[0].errno_ret(), None, "unset stays unset");
        assert_eq!(rules[1].errno_ret(), Some(1));
        let a = &rules[1].args().as_ref().unwrap()[0];
        assert_eq!((a.index(), a.value()), (1, 0o777));
        // An unknown action is an error naming the spec, not a silent drop.
        let mut bad = oci::LinuxSeccomp::new();
        bad.DefaultAction = "SCMP_ACT_BOGUS".into();
        s.Linux.as_mut().unwrap().Seccomp = Some(bad).into();
        assert!(to_oci(&s).unwrap_err().to_string().contains("OCI spec"));
    }
}
