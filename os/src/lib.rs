//! The one process-level memory call the worker makes on Linux, the workspace's only `unsafe` code (a system
//! call std has no safe wrapper for; sound whatever the mapping, see the SAFETY note).
//!
//! [`release_executable_pages`]: the binary holds every task family; starting up touches code of all of them (and
//! the kernel maps the neighbours of each page it faults in), some 12 MiB of clean file pages that an idle worker
//! never runs again. `MADV_PAGEOUT` hands them back; the code tasks run is faulted in again from the page cache as
//! it runs (pages another process maps too are left alone by the kernel).

use std::io;

/// Asks the kernel to reclaim the resident pages of this executable's read-only mappings (its code and
/// constants: clean pages, read again from the page cache or the file when next used). Returns the bytes of
/// mapping advised. Does nothing (and returns 0) outside Linux.
pub fn release_executable_pages() -> io::Result<usize> {
    #[cfg(target_os = "linux")]
    {
        let exe = std::fs::read_link("/proc/self/exe")?;
        let maps = std::fs::read_to_string("/proc/self/maps")?;
        let mut advised = 0;
        for m in read_only_mappings_of(&maps, &exe.to_string_lossy()) {
            // SAFETY: MADV_PAGEOUT never changes what the memory holds: it only reclaims clean, file-backed,
            // read-only pages, which the kernel reads back on the next access. The range is a whole mapping
            // listed by /proc/self/maps just now, page aligned; the executable's mappings are never unmapped.
            #[allow(unsafe_code)]
            let rc =
                unsafe { libc::madvise(m.start as *mut libc::c_void, m.len, libc::MADV_PAGEOUT) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            advised += m.len;
        }
        return Ok(advised);
    }
    #[allow(unreachable_code)]
    Ok(0)
}

/// One mapping from `/proc/self/maps`.
#[derive(Debug, PartialEq, Eq)]
struct Mapping {
    start: usize,
    len: usize,
}

/// The mappings of `path` that are neither writable nor shared-writable (code, constants), from the text of
/// `/proc/<pid>/maps`.
fn read_only_mappings_of(maps: &str, path: &str) -> Vec<Mapping> {
    maps.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let range = fields.next()?;
            let perms = fields.next()?;
            // Range, permissions, offset, device and inode hold no '/': the path is the rest of the line
            // (spaces and a " (deleted)" suffix included, as /proc/self/exe reads then).
            let name = line[line.find('/')?..].trim_end();
            if name != path || perms.contains('w') || !perms.starts_with('r') {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            let start = usize::from_str_radix(a, 16).ok()?;
            let end = usize::from_str_radix(b, 16).ok()?;
            (end > start).then(|| Mapping {
                start,
                len: end - start,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
5601bde7c000-5601beeaa000 r--p 00000000 fe:00 10119830                   /opt/bin/celeriac
5601beeaa000-5601c1c30000 r-xp 0102d000 fe:00 10119830                   /opt/bin/celeriac
5601c1c30000-5601c1eb8000 r--p 03db2000 fe:00 10119830                   /opt/bin/celeriac
5601c1eb8000-5601c1ec9000 rw-p 04039000 fe:00 10119830                   /opt/bin/celeriac
20000000000-20040000000 rw-p 00000000 00:00 0
7fa7fb6af000-7fa7fb6d5000 r--p 00000000 fe:00 326279                     /usr/lib/x86_64-linux-gnu/libc.so.6
7fa7fb6d5000-7fa7fb82b000 r-xp 00026000 fe:00 326279                     /opt/bin/celeriac (deleted)
7fff5daaf000-7fff5dad0000 rw-p 00000000 00:00 0                          [stack]
";

    fn expected() -> Vec<Mapping> {
        vec![
            Mapping {
                start: 0x5601bde7c000,
                len: 0x5601beeaa000 - 0x5601bde7c000,
            },
            Mapping {
                start: 0x5601beeaa000,
                len: 0x5601c1c30000 - 0x5601beeaa000,
            },
            Mapping {
                start: 0x5601c1c30000,
                len: 0x5601c1eb8000 - 0x5601c1c30000,
            },
        ]
    }

    #[test]
    fn only_the_executables_read_only_mappings() {
        assert_eq!(read_only_mappings_of(MAPS, "/opt/bin/celeriac"), expected());
        // A replaced executable reads "<path> (deleted)" in both places: only that mapping matches.
        assert_eq!(
            read_only_mappings_of(MAPS, "/opt/bin/celeriac (deleted)"),
            vec![Mapping {
                start: 0x7fa7fb6d5000,
                len: 0x7fa7fb82b000 - 0x7fa7fb6d5000,
            }]
        );
    }

    #[test]
    fn released_code_runs_again() {
        let advised = release_executable_pages().expect("madvise");
        if cfg!(target_os = "linux") {
            assert!(advised > 0, "the test binary has read-only mappings");
        }
        // The code just paged out is faulted back in and gives the same answer.
        assert_eq!(read_only_mappings_of(MAPS, "/opt/bin/celeriac"), expected());
    }
}
