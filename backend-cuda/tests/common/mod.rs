//! What the host emulation tests share: compiling an emulation's C++ driver with a set of
//! `-D` defines and keeping one running process per define set.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// Emulation processes of one C++ driver (`tests/<main_cpp>`), one per define set, in a
/// temporary directory removed on drop.
pub struct Emu {
    dir: PathBuf,
    procs: HashMap<String, Child>,
    main_cpp: &'static str,
    what: &'static str,
}

impl Emu {
    /// An emulator of `main_cpp` (`what` names it in errors); `tag` names its directory. One
    /// directory per emulator: tests of one binary run in parallel.
    pub fn new(tag: &str, main_cpp: &'static str, what: &'static str) -> Option<Emu> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("moe-router-cuda-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        Some(Emu {
            dir,
            procs: HashMap::new(),
            main_cpp,
            what,
        })
    }

    /// The process built with `defines`, compiled on first use; None when no C++ compiler is
    /// available. A compile error panics with the defines.
    pub fn proc(&mut self, defines: &[String]) -> Option<&mut Child> {
        let key = defines.join(" ");
        if !self.procs.contains_key(&key) {
            let exe = self.dir.join(format!("emu{}", self.procs.len()));
            let here = concat!(env!("CARGO_MANIFEST_DIR"), "/tests");
            let cc = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
            let st = Command::new(&cc)
                .args([
                    "-O1",
                    "-ffp-contract=off",
                    "-fno-fast-math",
                    "-std=c++20",
                    "-pthread",
                    "-w",
                ])
                .args(defines)
                .arg("-o")
                .arg(&exe)
                .arg(format!("{here}/{}", self.main_cpp))
                .status();
            match st {
                Ok(s) if s.success() => {}
                Ok(s) => panic!("compiling the {} ({key}) failed: {s}", self.what),
                Err(_) => return None,
            }
            let child = Command::new(&exe)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("start emulation");
            self.procs.insert(key.clone(), child);
        }
        self.procs.get_mut(&key)
    }
}

impl Drop for Emu {
    fn drop(&mut self) {
        for (_, mut c) in self.procs.drain() {
            drop(c.stdin.take());
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
