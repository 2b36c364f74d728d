//! Image references as `docker pull` takes them: `[host[:port]/]repo[:tag][@digest]`.
//! A first component with a `.` or a `:`, or `localhost`, names the registry;
//! otherwise the registry is Docker Hub (`docker.io`, with `library/` for one-part
//! names).

use std::fmt;

use super::digest::Digest;

pub const DEFAULT_REGISTRY: &str = "docker.io";
pub const DEFAULT_TAG: &str = "latest";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// `host[:port]`.
    pub registry: String,
    /// `path/to/repo`, lower case.
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("image reference {reference:?}: {why}")]
pub struct ReferenceError {
    reference: String,
    why: String,
}

impl Reference {
    pub fn parse(s: &str) -> Result<Self, ReferenceError> {
        let err = |why: &str| ReferenceError {
            reference: s.to_string(),
            why: why.to_string(),
        };
        if s.is_empty() || s.len() > 4096 {
            return Err(err("empty or longer than 4096 bytes"));
        }
        let (name, digest) = match s.split_once('@') {
            Some((n, d)) => (n, Some(d)),
            None => (s, None),
        };
        let digest = digest
            .map(|d| Digest::parse(d).map_err(|e| err(&e.to_string())))
            .transpose()?;
        // A tag follows the last ':' after the last '/' (a ':' before it is a port).
        let last_slash = name.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name[last_slash..].rfind(':') {
            Some(i) => (&name[..last_slash + i], Some(&name[last_slash + i + 1..])),
            None => (name, None),
        };
        if let Some(t) = tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && t.bytes()
                    .next()
                    .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
            if !ok {
                return Err(err(
                    "a tag is 1-128 of [A-Za-z0-9_.-], not starting with . or -",
                ));
            }
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), rest.to_string())
            }
            _ if name.contains('/') => (DEFAULT_REGISTRY.to_string(), name.to_string()),
            _ => (DEFAULT_REGISTRY.to_string(), format!("library/{name}")),
        };
        if registry.is_empty() || registry.contains(char::is_whitespace) {
            return Err(err("bad registry host"));
        }
        let component_ok = |c: &str| {
            !c.is_empty()
                && c.bytes()
                    .next()
                    .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                && c.bytes()
                    .last()
                    .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                && c.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
                })
        };
        if !repository.split('/').all(component_ok) {
            return Err(err(
                "a repository is lower-case components of [a-z0-9._-] separated by /",
            ));
        }
        Ok(Reference {
            registry,
            repository,
            tag: tag.map(str::to_string),
            digest,
        })
    }

    /// The registry client's form of it, built from the parts: parsing the text again
    /// would compile the client's reference grammar, about 70 ms per process.
    pub fn to_oci(&self) -> oci_client::Reference {
        let (reg, repo) = (self.registry.clone(), self.repository.clone());
        match (&self.tag, &self.digest) {
            (Some(t), Some(d)) => {
                oci_client::Reference::with_tag_and_digest(reg, repo, t.clone(), d.to_string())
            }
            (None, Some(d)) => oci_client::Reference::with_digest(reg, repo, d.to_string()),
            (t, None) => oci_client::Reference::with_tag(
                reg,
                repo,
                t.clone().unwrap_or_else(|| DEFAULT_TAG.to_string()),
            ),
        }
    }

    /// What to ask the registry for: the digest if there is one, else the tag.
    pub fn object(&self) -> &str {
        self.digest
            .as_ref()
            .map(Digest::as_str)
            .or(self.tag.as_deref())
            .unwrap_or(DEFAULT_TAG)
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn the_client_form_names_what_the_client_would_parse() {
        for s in [
            "busybox",
            "127.0.0.1:5000/a/b:1.2",
            &format!("reg.example/x@{D}"),
            &format!("localhost:5000/y:t@{D}"),
        ] {
            let ours = Reference::parse(s).unwrap().to_oci();
            let theirs: oci_client::Reference = s.parse().unwrap();
            assert_eq!(ours.registry(), theirs.registry(), "{s}");
            assert_eq!(ours.repository(), theirs.repository(), "{s}");
            assert_eq!(ours.tag(), theirs.tag(), "{s}");
            assert_eq!(ours.digest(), theirs.digest(), "{s}");
        }
    }

    #[test]
    fn registries_ports_tags_and_digests_are_told_apart() {
        let r = Reference::parse("127.0.0.1:5000/busybox:1.36").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("127.0.0.1:5000", "busybox", Some("1.36"))
        );
        let r = Reference::parse(&format!("localhost:5000/a/b@{D}")).unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("localhost:5000", "a/b")
        );
        assert_eq!(
            (r.tag.as_deref(), r.digest.as_ref().map(Digest::as_str)),
            (None, Some(D))
        );
        assert_eq!(r.object(), D);
        let r = Reference::parse("busybox").unwrap();
        assert_eq!(r.to_string(), "docker.io/library/busybox");
        assert_eq!(r.object(), "latest");
        let r = Reference::parse("ghcr.io/org/app:v1").unwrap();
        assert_eq!(r.to_string(), "ghcr.io/org/app:v1");
        let r = Reference::parse("org/app").unwrap();
        assert_eq!(r.registry, DEFAULT_REGISTRY);
        assert_eq!(r.repository, "org/app");
    }

    #[test]
    fn bad_references_are_refused_by_name() {
        for bad in [
            "",
            "UPPER/case",
            "host:5000/repo:",
            "repo:-bad",
            "repo@sha256:abc",
            "repo@md5:0123",
            "a//b",
            "repo/../x",
        ] {
            let e = Reference::parse(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
    }
}
