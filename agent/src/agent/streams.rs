//! The stdio family: ReadStdout, ReadStderr, WriteStdin, CloseStdin, TtyWinResize.

use super::Agent;
use crate::error::{invalid, Result};
use crate::stdio::{Input, TTY_EOF};

#[derive(Clone, Copy, Debug)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Agent {
    /// One read of up to `len` bytes; an empty reply is the end of the stream.
    pub async fn read_stream(
        &self,
        cid: &str,
        eid: &str,
        which: Stream,
        len: u32,
    ) -> Result<Vec<u8>> {
        let (_c, p) = self.containers.process(cid, eid)?;
        let slot = match which {
            Stream::Stdout => &p.stdout,
            Stream::Stderr => &p.stderr,
        };
        let mut guard = slot.lock().await;
        let Some(out) = guard.as_mut() else {
            return Ok(Vec::new());
        };
        let data = out
            .read(len as usize)
            .await
            .map_err(|e| anyhow::anyhow!("read {which:?} of {cid}/{eid}: {e}"))?;
        if data.is_empty() {
            // End of stream: drop our end so the fd is not held until removal.
            *guard = None;
        }
        Ok(data)
    }

    pub async fn write_stdin(&self, cid: &str, eid: &str, data: &[u8]) -> Result<u32> {
        let (_c, p) = self.containers.process(cid, eid)?;
        let mut guard = p.stdin.lock().await;
        let input = guard
            .as_mut()
            .ok_or_else(|| invalid(format!("stdin of {cid}/{eid} is closed")))?;
        input
            .write_all(data)
            .await
            .map_err(|e| anyhow::anyhow!("write stdin of {cid}/{eid}: {e}"))?;
        Ok(data.len() as u32)
    }

    pub async fn close_stdin(&self, cid: &str, eid: &str) -> Result<()> {
        let (_c, p) = self.containers.process(cid, eid)?;
        let mut guard = p.stdin.lock().await;
        if let Some(Input::Pty(pty)) = guard.as_ref() {
            // A terminal has no separate stdin to close: send end-of-transmission.
            pty.write_all(&[TTY_EOF])
                .await
                .map_err(|e| anyhow::anyhow!("close terminal input of {cid}/{eid}: {e}"))?;
        }
        *guard = None;
        Ok(())
    }

    pub async fn tty_win_resize(&self, cid: &str, eid: &str, rows: u32, cols: u32) -> Result<()> {
        let (_c, p) = self.containers.process(cid, eid)?;
        let tty = p
            .tty
            .as_ref()
            .ok_or_else(|| invalid(format!("{cid}/{eid} has no terminal")))?;
        let rows =
            u16::try_from(rows).map_err(|_| invalid(format!("row count {rows} too large")))?;
        let cols =
            u16::try_from(cols).map_err(|_| invalid(format!("column count {cols} too large")))?;
        tty.resize(rows, cols)?;
        Ok(())
    }
}
