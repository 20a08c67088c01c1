//! Output capture with a byte cap that keeps the head and the tail.
//!
//! A command may print gigabytes; the agent needs the start (what ran) and the end (how it
//! ended). Memory stays bounded by the cap whatever the command writes.

use std::collections::VecDeque;

/// Default cap per stream, about the 480 KB the open sandbox systems settled on.
pub const DEFAULT_OUTPUT_CAP: usize = 480 * 1024;

/// Collects a byte stream, keeping at most `cap` bytes: the first `cap / 2` and the last
/// `cap - cap / 2`.
#[derive(Debug)]
pub struct CappedOutput {
    cap: usize,
    head: Vec<u8>,
    tail: VecDeque<u8>,
    total: u64,
}

impl CappedOutput {
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            head: Vec::new(),
            tail: VecDeque::new(),
            total: 0,
        }
    }

    /// Bytes seen so far, before the cap.
    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn truncated(&self) -> bool {
        self.total > self.cap as u64
    }

    pub fn push(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        let head_cap = self.cap / 2;
        let tail_cap = self.cap - head_cap;
        // While everything still fits, keep it all in `head` so small outputs are one copy.
        if self.tail.is_empty() && self.head.len() + data.len() <= self.cap {
            self.head.extend_from_slice(data);
            return;
        }
        // Over the cap: move what `head` holds past `head_cap` into the tail first.
        if self.head.len() > head_cap {
            let spill = self.head.split_off(head_cap);
            self.tail.extend(spill);
        }
        let room = head_cap.saturating_sub(self.head.len());
        let take = room.min(data.len());
        self.head.extend_from_slice(&data[..take]);
        data = &data[take..];
        if data.len() >= tail_cap {
            self.tail.clear();
            self.tail.extend(&data[data.len() - tail_cap..]);
        } else {
            self.tail.extend(data);
            let excess = self.tail.len().saturating_sub(tail_cap);
            self.tail.drain(..excess);
        }
    }

    /// The kept bytes; when truncated, a line saying how many bytes were left out sits
    /// between head and tail.
    pub fn into_bytes(self) -> Vec<u8> {
        if !self.truncated() {
            let mut out = self.head;
            out.extend(self.tail);
            return out;
        }
        let omitted = self.total - (self.head.len() + self.tail.len()) as u64;
        let mut out = self.head;
        out.extend_from_slice(format!("\n[... {omitted} bytes omitted ...]\n").as_bytes());
        out.extend(self.tail);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_output_is_kept_whole() {
        let mut c = CappedOutput::new(10);
        c.push(b"abc");
        c.push(b"defghij");
        assert!(!c.truncated());
        assert_eq!(c.into_bytes(), b"abcdefghij");
    }

    #[test]
    fn large_output_keeps_head_and_tail() {
        let mut c = CappedOutput::new(10);
        for chunk in (0u8..100).collect::<Vec<_>>().chunks(7) {
            c.push(chunk);
        }
        assert!(c.truncated());
        assert_eq!(c.total(), 100);
        let out = c.into_bytes();
        assert!(out.starts_with(&[0, 1, 2, 3, 4]));
        assert!(out.ends_with(&[95, 96, 97, 98, 99]));
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("[... 90 bytes omitted ...]"));
    }

    #[test]
    fn one_huge_push() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let mut c = CappedOutput::new(100);
        c.push(&data);
        let out = c.into_bytes();
        assert_eq!(&out[..50], &data[..50]);
        assert_eq!(&out[out.len() - 50..], &data[950..]);
    }
}
