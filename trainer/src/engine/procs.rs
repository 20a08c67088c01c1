//! Finding and killing the processes of a local sandbox through `/proc`.

use std::collections::BTreeSet;
use std::path::Path;

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

#[derive(Clone, Copy, Debug)]
struct Stat {
    pid: i32,
    ppid: i32,
    session: i32,
}

fn read_stat(pid: i32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: split after the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(Stat {
        pid,
        ppid: f.get(1)?.parse().ok()?,
        session: f.get(3)?.parse().ok()?,
    })
}

fn all() -> Vec<Stat> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(read_stat)
        .collect()
}

/// A process and everything below it, with the sessions they belong to.
#[derive(Clone, Debug, Default)]
pub struct Tree {
    pub pids: BTreeSet<i32>,
    pub sessions: BTreeSet<i32>,
}

/// `root` and its descendants now.
pub fn descendants(root: u32) -> Tree {
    let Ok(root) = i32::try_from(root) else {
        return Tree::default();
    };
    let procs = all();
    let mut tree = Tree::default();
    tree.pids.insert(root);
    loop {
        let before = tree.pids.len();
        for p in &procs {
            if tree.pids.contains(&p.ppid) {
                tree.pids.insert(p.pid);
            }
        }
        if tree.pids.len() == before {
            break;
        }
    }
    for p in &procs {
        if tree.pids.contains(&p.pid) && p.session > 1 {
            tree.sessions.insert(p.session);
        }
    }
    tree
}

pub fn signal(pid: u32, sig: Signal) {
    if let Ok(p) = i32::try_from(pid)
        && p > 1
    {
        let _ = kill(Pid::from_raw(p), sig);
    }
}

pub fn kill_group(pgid: u32) {
    if let Ok(p) = i32::try_from(pgid)
        && p > 1
    {
        let _ = killpg(Pid::from_raw(p), Signal::SIGKILL);
    }
}

fn cwd_inside(pid: i32, root: &Path) -> bool {
    std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(root))
}

/// Kills, twice over (a process caught mid-fork may have a child the first pass missed),
/// every process in the sessions of `tree` or working inside `root`, never one of the
/// caller's own session.
pub fn kill_leftovers(tree: &Tree, root: Option<&Path>) {
    let me = i32::try_from(std::process::id()).unwrap_or(0);
    // Never the trainer's own session, whatever the tree says.
    let own_session = read_stat(me).map_or(0, |s| s.session);
    for _ in 0..2 {
        for p in all() {
            if p.pid <= 1 || p.pid == me {
                continue;
            }
            // By session, not by pid: a pid of the tree may have been reused since.
            let ours = (p.session != own_session && tree.sessions.contains(&p.session))
                || root.is_some_and(|r| cwd_inside(p.pid, r));
            if ours {
                let _ = kill(Pid::from_raw(p.pid), Signal::SIGKILL);
            }
        }
    }
}

/// Pids of live (not zombie) processes working inside `root`; tests use it to check that
/// nothing is left behind.
pub fn processes_inside(root: &Path) -> Vec<i32> {
    all()
        .into_iter()
        .filter(|p| cwd_inside(p.pid, root))
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{}/stat", p.pid))
                .ok()
                .and_then(|t| t.rfind(')').map(|i| t[i + 2..].starts_with('Z')))
                == Some(false)
        })
        .map(|p| p.pid)
        .collect()
}
