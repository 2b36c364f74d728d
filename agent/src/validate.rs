//! Validation of identifiers and paths sent by the host, which is untrusted.

use std::path::{Component, Path, PathBuf};

use crate::error::{invalid, Result};

/// The longest container or exec id the agent accepts, in bytes.
pub const MAX_ID_LEN: usize = 256;

/// Checks a container, exec or sandbox id: non-empty, at most 256 bytes, made of
/// `[A-Za-z0-9_.-]`, starting with an alphanumeric, and never containing `..`.
/// Ids become directory names, so anything that could escape a directory is refused.
pub fn check_id(kind: &str, id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(invalid(format!("{kind} id is empty")));
    }
    if id.len() > MAX_ID_LEN {
        return Err(invalid(format!(
            "{kind} id is {} bytes long; the limit is {MAX_ID_LEN}",
            id.len()
        )));
    }
    if id.contains("..") || id.contains('/') {
        return Err(invalid(format!("{kind} id {id:?} contains '/' or '..'")));
    }
    let first_ok = id.as_bytes()[0].is_ascii_alphanumeric();
    let rest_ok = id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if !first_ok || !rest_ok {
        return Err(invalid(format!(
            "{kind} id {id:?} has characters outside [A-Za-z0-9_.-] or does not start with a letter or digit"
        )));
    }
    Ok(())
}

/// Checks a path the host wants the agent to create or mount on: absolute, no `..`.
pub fn check_abs_path(what: &str, path: &str) -> Result<PathBuf> {
    if path.is_empty() {
        return Err(invalid(format!("{what} is empty")));
    }
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(invalid(format!("{what} {path:?} is not an absolute path")));
    }
    if p.components().any(|c| c == Component::ParentDir) {
        return Err(invalid(format!("{what} {path:?} contains '..'")));
    }
    if path.contains('\0') {
        return Err(invalid(format!("{what} contains a NUL byte")));
    }
    Ok(p.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_ids_pass() {
        for id in ["c1", "a", "abc-DEF_1.2", &"f".repeat(MAX_ID_LEN)] {
            check_id("container", id).unwrap();
        }
    }

    #[test]
    fn bad_ids_are_refused_with_a_reason() {
        let long = "x".repeat(MAX_ID_LEN + 1);
        for (id, needle) in [
            ("", "empty"),
            (long.as_str(), "limit is 256"),
            ("a/b", "'/'"),
            ("..", "'..'"),
            ("a..b", "'..'"),
            (".hidden", "start with"),
            ("a b", "characters"),
            ("a\0b", "characters"),
        ] {
            let err = check_id("container", id).unwrap_err().to_string();
            assert!(err.contains(needle), "{id:?}: {err}");
        }
    }

    #[test]
    fn paths_must_be_absolute_without_parent_components() {
        assert!(check_abs_path("mount point", "/run/x").is_ok());
        assert!(check_abs_path("mount point", "run/x").is_err());
        assert!(check_abs_path("mount point", "/run/../etc").is_err());
        assert!(check_abs_path("mount point", "").is_err());
    }
}
