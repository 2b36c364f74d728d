//! virtio-blk: a disk backed by a file, read-only or read-write, with flush and the
//! serial string (`VIRTIO_BLK_T_GET_ID`) the agent finds disks by.

use std::fs::File;
use std::os::unix::fs::FileExt;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::mmio::VirtioDevice;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;

pub struct Block {
    file: File,
    read_only: bool,
    sectors: u64,
    serial: String,
}

impl Block {
    pub fn new(file: File, read_only: bool, serial: String) -> std::io::Result<Self> {
        let sectors = file.metadata()?.len() / 512;
        Ok(Block {
            file,
            read_only,
            sectors,
            serial,
        })
    }

    /// One request: its header, its data buffers and its status byte; returns the bytes
    /// written to the driver.
    fn request(&mut self, mem: &GuestMemoryMmap, descs: &[(u64, u32, bool)]) -> u32 {
        let (Some(&(hdr, _, _)), Some(&(status, _, _))) = (descs.first(), descs.last()) else {
            return 0;
        };
        let kind: u32 = mem.read_obj(GuestAddress(hdr)).unwrap_or(u32::MAX);
        let sector: u64 = mem.read_obj(GuestAddress(hdr + 8)).unwrap_or(0);
        let data = &descs[1..descs.len() - 1];
        let mut written = 0u32;
        let mut offset = sector * 512;
        let result = match kind {
            T_IN => data.iter().try_for_each(|&(addr, len, _)| {
                let mut buf = vec![0u8; len as usize];
                self.file.read_exact_at(&mut buf, offset)?;
                mem.write_slice(&buf, GuestAddress(addr))
                    .map_err(std::io::Error::other)?;
                offset += u64::from(len);
                written += len;
                Ok(())
            }),
            T_OUT if self.read_only => {
                Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied))
            }
            T_OUT => data.iter().try_for_each(|&(addr, len, _)| {
                let mut buf = vec![0u8; len as usize];
                mem.read_slice(&mut buf, GuestAddress(addr))
                    .map_err(std::io::Error::other)?;
                self.file.write_all_at(&buf, offset)?;
                offset += u64::from(len);
                Ok(())
            }),
            T_FLUSH => self.file.sync_data(),
            T_GET_ID => data.first().map_or(Ok(()), |&(addr, len, _)| {
                let mut id = self.serial.as_bytes().to_vec();
                id.resize(20.min(len as usize), 0);
                written += id.len() as u32;
                mem.write_slice(&id, GuestAddress(addr))
                    .map_err(std::io::Error::other)
            }),
            _ => {
                let _ = mem.write_obj(S_UNSUPP, GuestAddress(status));
                return written + 1;
            }
        };
        let s = if result.is_ok() { S_OK } else { S_IOERR };
        let _ = mem.write_obj(s, GuestAddress(status));
        written + 1
    }
}

impl VirtioDevice for Block {
    fn device_id(&self) -> u32 {
        2
    }

    fn features(&self) -> u64 {
        F_FLUSH | if self.read_only { F_RO } else { 0 }
    }

    fn num_queues(&self) -> usize {
        1
    }

    fn config(&self) -> Vec<u8> {
        self.sectors.to_le_bytes().to_vec()
    }

    fn notify(&mut self, _index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        let queue = &mut queues[0];
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let descs: Vec<(u64, u32, bool)> = chain
                .map(|d| (d.addr().0, d.len(), d.is_write_only()))
                .collect();
            let len = self.request(mem, &descs);
            used |= queue.add_used(mem, head, len).is_ok();
        }
        used
    }
}
