//! The user a container's process runs as, from `--user` or an image config's `User`
//! (`user`, `user:group`, `uid`, `uid:gid`), resolved as `docker run` does against the
//! container's own `/etc/passwd` and `/etc/group`: a name must be there, a number
//! need not be; the primary group is the passwd entry's unless one is given; the
//! supplementary groups are those of `/etc/group` that list the user.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    #[error("user {spec:?}: no user {name:?} in the container's /etc/passwd")]
    NoSuchUser { spec: String, name: String },
    #[error("user {spec:?}: no group {name:?} in the container's /etc/group")]
    NoSuchGroup { spec: String, name: String },
    #[error("user {spec:?}: a name needs the container's rootfs to look it up")]
    NoRootfs { spec: String },
    #[error("user {spec:?}: {why}")]
    Bad { spec: String, why: String },
}

/// One `name:x:id:...` line's name, id and (for passwd) primary group.
struct Entry {
    name: String,
    id: u32,
    gid: u32,
    members: Vec<String>,
}

/// `etc/<file>` of `rootfs`, empty if missing; a file or `/etc` that is a symbolic
/// link is not followed (it could point outside the rootfs).
fn read_table(rootfs: &Path, file: &str) -> Result<Vec<Entry>, String> {
    let etc = rootfs.join("etc");
    let path: PathBuf = etc.join(file);
    for p in [&etc, &path] {
        match p.symlink_metadata() {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(format!("{} is a symbolic link; not followed", p.display()))
            }
            Ok(_) => {}
            Err(_) => return Ok(Vec::new()),
        }
    }
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            let id = f.get(2)?.parse().ok()?;
            Some(Entry {
                name: f[0].to_string(),
                id,
                gid: f.get(3).and_then(|g| g.parse().ok()).unwrap_or(0),
                members: f
                    .get(3)
                    .map(|m| {
                        m.split(',')
                            .filter(|s| !s.is_empty())
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect())
}

/// Resolves `spec` against `rootfs` (`None`: the rootfs is not on this host, so only
/// numbers are accepted).
pub fn resolve(spec: &str, rootfs: Option<&Path>) -> Result<User, UserError> {
    let spec_s = spec.to_string();
    if spec.is_empty() {
        return Ok(User::default());
    }
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let bad = |why: String| UserError::Bad {
        spec: spec_s.clone(),
        why,
    };
    if user.is_empty() || group.is_some_and(str::is_empty) {
        return Err(bad("expected USER[:GROUP]".into()));
    }
    let numeric = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    let Some(rootfs) = rootfs else {
        let num = |s: &str| s.parse::<u32>().ok().filter(|_| numeric(s));
        return match (num(user), group.map(num)) {
            (Some(uid), None) => Ok(User {
                uid,
                ..User::default()
            }),
            (Some(uid), Some(Some(gid))) => Ok(User {
                uid,
                gid,
                additional_gids: vec![],
            }),
            _ => Err(UserError::NoRootfs { spec: spec_s }),
        };
    };
    // Passwd entries carry the primary group in the fourth field; group entries their
    // members there.
    let passwd = read_table(rootfs, "passwd").map_err(&bad)?;
    let groups = read_table(rootfs, "group").map_err(&bad)?;
    let found = if numeric(user) {
        let uid = user
            .parse::<u32>()
            .map_err(|_| bad(format!("uid {user} is out of range")))?;
        passwd
            .iter()
            .find(|e| e.id == uid)
            .map_or((uid, 0, None), |e| (uid, e.gid, Some(e.name.as_str())))
    } else {
        let e = passwd
            .iter()
            .find(|e| e.name == user)
            .ok_or_else(|| UserError::NoSuchUser {
                spec: spec_s.clone(),
                name: user.to_string(),
            })?;
        (e.id, e.gid, Some(e.name.as_str()))
    };
    let (uid, mut gid, name) = found;
    if let Some(g) = group {
        gid = if numeric(g) {
            g.parse()
                .map_err(|_| bad(format!("gid {g} is out of range")))?
        } else {
            groups
                .iter()
                .find(|e| e.name == g)
                .map(|e| e.id)
                .ok_or_else(|| UserError::NoSuchGroup {
                    spec: spec_s.clone(),
                    name: g.to_string(),
                })?
        };
    }
    let additional_gids = match name {
        Some(n) => groups
            .iter()
            .filter(|e| e.members.iter().any(|m| m == n) && e.id != gid)
            .map(|e| e.id)
            .collect(),
        None => vec![],
    };
    Ok(User {
        uid,
        gid,
        additional_gids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rootfs() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("etc")).unwrap();
        std::fs::write(
            t.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nwww:x:33:33::/var/www:/bin/false\napp:x:1000:1000::/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            t.path().join("etc/group"),
            "root:x:0:\nwww:x:33:\napp:x:1000:\ndocker:x:999:app,www\nvideo:x:44:app\n",
        )
        .unwrap();
        t
    }

    fn user(uid: u32, gid: u32, additional_gids: &[u32]) -> User {
        User {
            uid,
            gid,
            additional_gids: additional_gids.to_vec(),
        }
    }

    #[test]
    fn names_and_numbers_resolve_as_docker_run_does() {
        let t = rootfs();
        let r = |s| resolve(s, Some(t.path()));
        assert_eq!(r(""), Ok(User::default()));
        assert_eq!(r("app"), Ok(user(1000, 1000, &[999, 44])));
        assert_eq!(r("www:video"), Ok(user(33, 44, &[999])));
        assert_eq!(r("1000"), Ok(user(1000, 1000, &[999, 44])));
        assert_eq!(r("4242"), Ok(user(4242, 0, &[])));
        assert_eq!(r("4242:7"), Ok(user(4242, 7, &[])));
        assert!(matches!(r("nobody"), Err(UserError::NoSuchUser { .. })));
        assert!(matches!(
            r("app:nogroup"),
            Err(UserError::NoSuchGroup { .. })
        ));
        assert!(matches!(r("app:"), Err(UserError::Bad { .. })));
        assert!(matches!(r("99999999999"), Err(UserError::Bad { .. })));
    }

    #[test]
    fn without_a_rootfs_only_numbers_resolve() {
        assert_eq!(resolve("5:6", None), Ok(user(5, 6, &[])));
        assert_eq!(resolve("5", None), Ok(user(5, 0, &[])));
        assert!(matches!(
            resolve("app", None),
            Err(UserError::NoRootfs { .. })
        ));
    }

    #[test]
    fn a_linked_passwd_is_not_followed() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("etc")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", t.path().join("etc/passwd")).unwrap();
        let e = resolve("root", Some(t.path())).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
    }
}
