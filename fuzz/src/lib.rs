//! What the fuzz targets (`fuzz_targets/*.rs`, run by `cargo xtask fuzz`)
//! share: a cursor over the fuzzer's bytes, and the log-file harness of the
//! `cri` and `docker` targets ([`logfile`]).
//!
//! Every target takes its settings from the first bytes of its input
//! (documented per target) and the data to parse from the rest, so a seed
//! is a short header followed by real bytes (see `fuzz/corpus/`).

pub mod logfile;
#[cfg(test)]
mod seeds;

/// Reads the fuzzer's bytes front to back; past the end, numbers are 0 and
/// slices empty (every input is usable).
pub struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub fn new(data: &'a [u8]) -> Cursor<'a> {
        Cursor { data }
    }

    pub fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    /// Little-endian.
    pub fn u16(&mut self) -> u16 {
        u16::from(self.byte()) | (u16::from(self.byte()) << 8)
    }

    /// The next `n` bytes (fewer at the end).
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    /// Up to the next `sep` (dropped), or everything left.
    pub fn until(&mut self, sep: u8) -> &'a [u8] {
        match self.data.iter().position(|&b| b == sep) {
            Some(i) => {
                let head = &self.data[..i];
                self.data = &self.data[i + 1..];
                head
            }
            None => self.rest(),
        }
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// `s` as text, invalid UTF-8 replaced (Kubernetes and Docker hand the
/// agent strings).
pub fn text(s: &[u8]) -> String {
    String::from_utf8_lossy(s).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cursor_reads_numbers_slices_and_zeros_past_the_end() {
        let mut c = Cursor::new(b"\x01\x02\x03ab\ncd");
        assert_eq!(c.byte(), 1);
        assert_eq!(c.u16(), 0x0302);
        assert_eq!(c.until(b'\n'), b"ab");
        assert_eq!(c.take(5), b"cd");
        assert!(c.is_empty());
        assert_eq!((c.byte(), c.u16(), c.rest()), (0, 0, &b""[..]));
    }
}
