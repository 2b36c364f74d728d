//! A layer spooled to disk as it downloads and read while it is written, so a layer
//! is unpacked as its bytes arrive instead of after the whole image has downloaded.
//!
//! The writer (the download) reports how far the file is written and, at the end,
//! whether the bytes matched their digest; a reader blocks until bytes it has not
//! read are written, and reads the end of the file only once the writer has finished:
//! as an end of file if the download succeeded, as an error if it did not.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};

#[derive(Default)]
struct State {
    written: u64,
    /// `Some` once the writer has finished: `Err` carries why it failed.
    done: Option<Result<(), String>>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

/// The writer's side: tells readers what has been written.
pub struct Spool {
    shared: Arc<Shared>,
}

/// The reader's side.
pub struct SpoolReader {
    file: File,
    pos: u64,
    shared: Arc<Shared>,
}

/// Makes the spool file at `path` (empty) and both sides of it.
pub fn create(path: &Path) -> io::Result<(Spool, SpoolReader)> {
    File::create(path)?;
    let shared = Arc::new(Shared::default());
    Ok((
        Spool {
            shared: shared.clone(),
        },
        SpoolReader {
            file: File::open(path)?,
            pos: 0,
            shared,
        },
    ))
}

impl Spool {
    fn update(&self, f: impl FnOnce(&mut State)) {
        let mut s = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
        self.shared.changed.notify_all();
    }

    /// `n` more bytes are in the file.
    pub fn wrote(&self, n: u64) {
        self.update(|s| s.written += n);
    }

    /// The download ended: its bytes are all written and checked, or it failed.
    pub fn finish(&self, result: Result<(), String>) {
        self.update(|s| {
            s.done.get_or_insert(result);
        });
    }
}

impl Drop for Spool {
    /// A writer dropped before it finished (its download failed or was cancelled)
    /// must not leave a reader waiting.
    fn drop(&mut self) {
        self.finish(Err("the download stopped".into()));
    }
}

impl SpoolReader {
    /// Waits for the writer to finish; its result.
    pub fn outcome(&self) -> Result<(), String> {
        let mut s = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(done) = &s.done {
                return done.clone();
            }
            s = self
                .shared
                .changed
                .wait(s)
                .unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl Read for SpoolReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let available = {
            let mut s = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if s.written > self.pos {
                    break s.written - self.pos;
                }
                match &s.done {
                    Some(Ok(())) => return Ok(0),
                    Some(Err(why)) => return Err(io::Error::other(why.clone())),
                    None => {}
                }
                s = self
                    .shared
                    .changed
                    .wait(s)
                    .unwrap_or_else(|p| p.into_inner());
            }
        };
        let want = buf
            .len()
            .min(usize::try_from(available).unwrap_or(usize::MAX));
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the spool file is shorter than its writer reported",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_reader_follows_the_writer_to_the_end() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("layer");
        let (spool, mut reader) = create(&path).unwrap();
        let writer = std::thread::spawn(move || {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .unwrap();
            for chunk in [&b"hello "[..], b"spooled ", b"world"] {
                std::thread::sleep(std::time::Duration::from_millis(5));
                f.write_all(chunk).unwrap();
                spool.wrote(chunk.len() as u64);
            }
            spool.finish(Ok(()));
        });
        let mut got = String::new();
        reader.read_to_string(&mut got).unwrap();
        writer.join().unwrap();
        assert_eq!(got, "hello spooled world");
        assert_eq!(reader.outcome(), Ok(()));
    }

    #[test]
    fn a_failed_or_dropped_writer_is_an_error_to_the_reader() {
        let tmp = tempfile::tempdir().unwrap();
        let (spool, mut reader) = create(&tmp.path().join("a")).unwrap();
        spool.finish(Err("digest mismatch".into()));
        let e = reader.read(&mut [0; 8]).unwrap_err();
        assert_eq!(e.to_string(), "digest mismatch");
        let (spool, mut reader) = create(&tmp.path().join("b")).unwrap();
        drop(spool);
        assert!(reader.read(&mut [0; 8]).is_err());
        assert_eq!(reader.outcome(), Err("the download stopped".into()));
    }
}
