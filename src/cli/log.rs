//! Log output: one line per event on stderr.
//!
//! Some libraries format their messages with `{:#?}`, over several lines
//! (glommio's "registering buffers ... Skipping" warning prints an
//! `io::Error` that way); a log line that spans lines breaks every log
//! shipper. The writer folds an event's inner line breaks (and the
//! indentation after them) into single spaces.

use std::io::{self, Write};

/// Writes each event (one `write` call of the fmt layer) as one line.
pub struct OneLine<W>(pub W);

impl<W: Write> Write for OneLine<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let body = buf.strip_suffix(b"\n").unwrap_or(buf);
        if !body.contains(&b'\n') {
            self.0.write_all(buf)?;
            return Ok(buf.len());
        }
        let mut out = Vec::with_capacity(buf.len());
        let mut i = 0;
        while i < body.len() {
            if body[i] == b'\n' {
                out.push(b' ');
                i += 1;
                while i < body.len() && (body[i] == b' ' || body[i] == b'\t') {
                    i += 1;
                }
            } else {
                out.push(body[i]);
                i += 1;
            }
        }
        if body.len() < buf.len() {
            out.push(b'\n');
        }
        self.0.write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// For `tracing_subscriber::fmt().with_writer(...)`: stderr, one line per
/// event.
pub fn stderr_one_line() -> OneLine<io::Stderr> {
    OneLine(io::stderr())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folded(s: &str) -> String {
        let mut w = OneLine(Vec::new());
        w.write_all(s.as_bytes()).unwrap();
        String::from_utf8(w.0).unwrap()
    }

    #[test]
    fn events_become_one_line() {
        assert_eq!(folded("plain line\n"), "plain line\n");
        assert_eq!(
            folded("WARN Skipping Os {\n    code: 12,\n    kind: OutOfMemory,\n}\n"),
            "WARN Skipping Os { code: 12, kind: OutOfMemory, }\n"
        );
        assert_eq!(folded("no newline at all"), "no newline at all");
    }
}
